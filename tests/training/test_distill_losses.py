"""token_logprobs, token_entropy, token_kl and distill_loss against independent numpy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.training import losses

# Jitted once per shape: eager op-by-op dispatch compiles every primitive and is much slower.
token_logprobs = jax.jit(losses.token_logprobs)
token_entropy = jax.jit(losses.token_entropy)
token_kl = jax.jit(losses.token_kl, static_argnames="temperature")
distill_loss = jax.jit(losses.distill_loss, static_argnames=("temperature", "kind"))


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_kl_loop(p_logits, q_logits, mask, t):
    """Sum over masked tokens of KL(softmax(p/t) || softmax(q/t)), by explicit loops."""
    total = 0.0
    b, seq, v = p_logits.shape
    for i in range(b):
        for j in range(seq):
            if not mask[i, j]:
                continue
            lp = np_log_softmax(p_logits[i, j] / t)
            lq = np_log_softmax(q_logits[i, j] / t)
            total += sum(math.exp(lp[k]) * (lp[k] - lq[k]) for k in range(v))
    return total


@pytest.mark.parametrize("vocab", [11, 64])
def test_token_logprobs_matches_numpy_and_autodiff(vocab):
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(2, 4, vocab)) * 3).astype(np.float32)
    targets = rng.integers(0, vocab, size=(2, 4))
    w = rng.normal(size=(2, 4)).astype(np.float32)
    got = token_logprobs(jnp.asarray(logits), jnp.asarray(targets))
    assert got.dtype == jnp.float32
    want = np.take_along_axis(np_log_softmax(logits.astype(np.float64)), targets[..., None], -1)
    np.testing.assert_allclose(np.asarray(got), want[..., 0], rtol=1e-5, atol=1e-6)

    def ours(x):
        return jnp.sum(jnp.asarray(w) * losses.token_logprobs(x, jnp.asarray(targets)))

    def autodiff(x):
        lp = jnp.take_along_axis(jax.nn.log_softmax(x), jnp.asarray(targets)[..., None], -1)
        return jnp.sum(jnp.asarray(w) * lp[..., 0])

    g_ours = jax.jit(jax.grad(ours))(jnp.asarray(logits))
    g_ref = jax.jit(jax.grad(autodiff))(jnp.asarray(logits))
    np.testing.assert_allclose(np.asarray(g_ours), np.asarray(g_ref), rtol=1e-5, atol=1e-6)


def test_token_logprobs_bf16_input_gives_f32():
    logits = jnp.zeros((1, 2, 8), jnp.bfloat16)
    got = token_logprobs(logits, jnp.array([[0, 3]]))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), -math.log(8), rtol=1e-6)


def test_token_entropy_matches_numpy_and_handles_banned_tokens():
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(2, 3, 7)) * 2).astype(np.float32)
    lp = np_log_softmax(logits.astype(np.float64))
    want = -(np.exp(lp) * lp).sum(-1)
    np.testing.assert_allclose(np.asarray(token_entropy(jnp.asarray(logits))), want, rtol=1e-5)
    # Two of four tokens banned (-inf): the entropy is log 2, and value and gradient stay finite.
    banned = jnp.array([[[0.0, -jnp.inf, 0.0, -jnp.inf]]])
    np.testing.assert_allclose(np.asarray(token_entropy(banned)), [[math.log(2)]], rtol=1e-6)
    g = jax.jit(jax.grad(lambda x: jnp.sum(losses.token_entropy(x))))(banned)
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("t", [1.0, 0.7])
def test_token_kl_matches_the_loop_reference(t):
    rng = np.random.default_rng(2)
    p = (rng.normal(size=(2, 3, 9)) * 2).astype(np.float32)
    q = (rng.normal(size=(2, 3, 9)) * 2).astype(np.float32)
    got = np.asarray(token_kl(jnp.asarray(p), jnp.asarray(q), temperature=t))
    assert got.shape == (2, 3) and np.all(got >= 0)
    for i in range(2):
        for j in range(3):
            one = np.zeros((1, 1), bool)
            one[0, 0] = True
            want = np_kl_loop(p[i : i + 1, j : j + 1], q[i : i + 1, j : j + 1], one, t)
            np.testing.assert_allclose(got[i, j], want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(token_kl(jnp.asarray(p), jnp.asarray(p))), 0, atol=1e-6)
    # a token the policy bans adds nothing (0 log 0 = 0): KL([.5 .5 0] || [1/3 1/3 1/3]) = log 1.5
    banned = jnp.array([[[0.0, 0.0, -jnp.inf]]])
    np.testing.assert_allclose(
        np.asarray(token_kl(banned, jnp.zeros((1, 1, 3)))), [[math.log(1.5)]], rtol=1e-6
    )


@pytest.mark.parametrize("kind", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distill_kl_matches_numpy(kind, temperature):
    rng = np.random.default_rng(2)
    student = (rng.normal(size=(2, 5, 9)) * 2).astype(np.float32)
    teacher = (rng.normal(size=(2, 5, 9)) * 2).astype(np.float32)
    mask = (rng.random((2, 5)) > 0.3).astype(np.float32)
    total, aux = distill_loss(
        jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(mask), temperature, kind
    )
    s, t = student.astype(np.float64), teacher.astype(np.float64)
    kl = (
        np_kl_loop(t, s, mask, temperature)
        if kind == "forward"
        else np_kl_loop(s, t, mask, temperature)
    )
    np.testing.assert_allclose(float(aux["kl"]), kl, rtol=1e-5)
    np.testing.assert_allclose(float(total), temperature**2 * kl, rtol=1e-5)
    assert float(aux["weight"]) == mask.sum()


def test_distill_identical_distributions_give_zero():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 3, 6)).astype(np.float32))
    for kind in ("forward", "reverse"):
        total, _ = distill_loss(x, x, jnp.ones((2, 3)), 1.5, kind)
        assert abs(float(total)) < 1e-6


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_distill_gradient_flows_to_student_only(kind):
    rng = np.random.default_rng(4)
    student = jnp.asarray(rng.normal(size=(2, 3, 5)).astype(np.float32))
    teacher = jnp.asarray(rng.normal(size=(2, 3, 5)).astype(np.float32))
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    t = 2.0
    loss = jax.grad(lambda s, te: losses.distill_loss(s, te, mask, t, kind)[0], argnums=(0, 1))
    g_s, g_t = jax.jit(loss)(student, teacher)
    assert np.all(np.asarray(g_t) == 0.0)
    assert np.all(np.asarray(g_s)[np.asarray(mask) == 0] == 0.0)
    if kind == "forward":
        # d/ds of T^2 KL(p_t || p_s) with p = softmax(logits / T) is T (p_s - p_t).
        p_s = np.exp(np_log_softmax(np.asarray(student, np.float64) / t))
        p_t = np.exp(np_log_softmax(np.asarray(teacher, np.float64) / t))
        want = t * (p_s - p_t) * np.asarray(mask)[..., None]
        np.testing.assert_allclose(np.asarray(g_s), want, rtol=1e-5, atol=1e-6)


def test_distill_rejects_unknown_kind():
    with pytest.raises(ValueError, match="forward"):
        losses.distill_loss(jnp.zeros((1, 1, 2)), jnp.zeros((1, 1, 2)), jnp.ones((1, 1)), kind="js")
