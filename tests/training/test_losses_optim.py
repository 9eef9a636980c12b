"""Loss and optimizer pieces against independent numpy / closed-form references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm.config import OptimConfig, replace
from jaxllm.errors import ConfigError
from jaxllm.training.losses import cross_entropy, head_cross_entropy
from jaxllm.training.optim import decay_mask, lr_schedule, make_optimizer


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("z", [0.0, 1e-3])
def test_cross_entropy_matches_numpy(z):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, size=(3, 5))
    mask = (rng.random((3, 5)) > 0.3).astype(np.float32)
    total, aux = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), z)
    lp = np_log_softmax(logits.astype(np.float64))
    nll = -np.take_along_axis(lp, targets[..., None], -1)[..., 0]
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    want = (nll * mask).sum() + z * (lse**2 * mask).sum()
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    assert float(aux["weight"]) == mask.sum()
    acc = ((logits.argmax(-1) == targets) * mask).sum()
    assert float(aux["correct"]) == acc


def test_cross_entropy_of_bf16_logits_reduces_in_f32_and_returns_a_bf16_gradient():
    """bf16 logits (`model.logits_dtype: bfloat16`): the loss is the f64 reference on the
    same rounded values to f32 accuracy, and the gradient w.r.t. the logits is bf16, equal
    to (softmax - onehot) * mask rounded to bf16."""
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 6, 37)) * 4, jnp.bfloat16)
    targets = rng.integers(0, 37, size=(2, 6))
    mask = (rng.random((2, 6)) > 0.2).astype(np.float32)

    def loss(x):
        return cross_entropy(x, jnp.asarray(targets), jnp.asarray(mask))[0]

    total, grad = jax.value_and_grad(loss)(logits)
    x = np.asarray(logits.astype(jnp.float32), np.float64)
    lp = np_log_softmax(x)
    want = -(np.take_along_axis(lp, targets[..., None], -1)[..., 0] * mask).sum()
    np.testing.assert_allclose(float(total), want, rtol=1e-6)
    assert grad.dtype == jnp.bfloat16
    want_g = (np.exp(lp) - np.eye(37)[targets]) * mask[..., None]
    np.testing.assert_allclose(np.asarray(grad, np.float64), want_g, atol=4e-3, rtol=8e-3)


def test_masked_tokens_do_not_contribute():
    logits = jnp.zeros((1, 2, 4)).at[0, 1].set(jnp.array([100.0, -100, 0, 0]))
    total, _ = cross_entropy(logits, jnp.array([[0, 1]]), jnp.array([[1.0, 0.0]]))
    np.testing.assert_allclose(float(total), math.log(4), rtol=1e-6)


def test_decay_mask_skips_biases_norms_and_vectors():
    params = {
        "attn": {"q": jnp.ones((4, 2, 2)), "q_bias": jnp.ones((2, 2)), "o_bias": jnp.ones(4)},
        "norm": {"scale": jnp.ones(4), "bias": jnp.ones(4)},
        "embed": {"embedding": jnp.ones((10, 4))},
    }
    m = decay_mask(params)
    assert m["attn"]["q"] and m["embed"]["embedding"]
    assert not any(
        [m["attn"]["q_bias"], m["attn"]["o_bias"], m["norm"]["scale"], m["norm"]["bias"]]
    )


def test_schedule_warmup_then_cosine_closed_form():
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    s = lr_schedule(cfg, 110)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(s(10)), 1e-3, rtol=1e-6)
    t = (60 - 10) / 100
    want = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * t))
    np.testing.assert_allclose(float(s(60)), want, rtol=1e-5)
    np.testing.assert_allclose(float(s(110)), 1e-4, rtol=1e-5)


def test_constant_and_linear_schedules():
    c = lr_schedule(OptimConfig(lr=2.0, warmup_steps=4, schedule="constant"), 100)
    assert [float(c(i)) for i in (2, 4, 50)] == [1.0, 2.0, 2.0]
    lin = lr_schedule(OptimConfig(lr=2.0, warmup_steps=0, min_lr_ratio=0.5, schedule="linear"), 10)
    np.testing.assert_allclose([float(lin(i)) for i in (0, 5, 10)], [2.0, 1.5, 1.0], rtol=1e-6)


def test_wsd_holds_lr_then_cools_down_by_one_minus_sqrt():
    """100 steps, warmup 10, the last 20 % cooling from 1.0 to 0.1: written out by hand."""
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="wsd")
    s = lr_schedule(cfg, 100)
    want = {0: 0.0, 5: 0.5, 10: 1.0, 50: 1.0, 80: 1.0, 85: 0.1 + 0.9 * (1 - math.sqrt(5 / 20)),
            90: 0.1 + 0.9 * (1 - math.sqrt(0.5)), 100: 0.1, 120: 0.1}  # fmt: skip
    np.testing.assert_allclose([float(s(k)) for k in want], list(want.values()), rtol=1e-6)
    values = np.array([float(s(k)) for k in range(10, 101)])
    assert np.all(np.diff(values) <= 0)  # after the warmup it never rises
    # a short run: 30 % of 10 steps is 3, after a warmup of 8 only 2 are left to cool down
    short = lr_schedule(replace(cfg, warmup_steps=8, decay_fraction=0.3), 10)
    np.testing.assert_allclose([float(short(k)) for k in (8, 9, 10)],
                               [1.0, 0.1 + 0.9 * (1 - math.sqrt(0.5)), 0.1], rtol=1e-6)  # fmt: skip


@pytest.mark.parametrize("bad", [0.0, 1.5])
def test_wsd_decay_fraction_out_of_range_names_the_key(bad):
    from jaxllm.config import from_dict

    with pytest.raises(ConfigError, match=r"decay_fraction.*in \(0, 1\]"):
        from_dict(
            {"stage": "pretrain", "train": {"optim": {"schedule": "wsd", "decay_fraction": bad}}}
        )


def test_grad_norm_helper_is_global_l2():
    tree = {"a": jnp.array([3.0]), "b": jnp.array([[4.0]])}
    assert float(optax.tree.norm(tree)) == 5.0
    assert jax.tree.structure(decay_mask(tree)) == jax.tree.structure(tree)


@pytest.mark.parametrize("z,chunk", [(0.0, 4), (1e-3, 2), (1e-3, 5)])
def test_head_cross_entropy_matches_numpy_values_and_gradients(z, chunk):
    """The fused output layer + loss against numpy: the sums, and dx / dw from the closed
    form d(sum)/d(logits) = mask * ((1 + 2 z lse) softmax - onehot) (chunk 5 does not
    divide L = 8: one chunk)."""
    rng = np.random.default_rng(1)
    B, L, D, V = 3, 8, 6, 64
    x = rng.normal(size=(B, L, D)).astype(np.float32)
    w = rng.normal(size=(V, D)).astype(np.float32)
    t = rng.integers(0, V, size=(B, L))
    m = (rng.random((B, L)) > 0.3).astype(np.float32)

    def loss(x, w):
        return head_cross_entropy(x, w, jnp.asarray(t), jnp.asarray(m), z, chunk)

    (total, aux), (dx, dw) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(x, w)
    logits = x.astype(np.float64) @ w.T.astype(np.float64)
    lp = np_log_softmax(logits)
    lse = np.log(np.exp(logits).sum(-1))
    nll = -np.take_along_axis(lp, t[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(total), (nll * m).sum() + z * (lse**2 * m).sum(), rtol=1e-5)
    assert float(aux["correct"]) == ((logits.argmax(-1) == t) * m).sum()
    assert float(aux["weight"]) == m.sum()
    g = np.exp(lp) * (m * (1 + 2 * z * lse))[..., None]
    g -= np.eye(V)[t] * m[..., None]
    np.testing.assert_allclose(np.asarray(dx), g @ w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), np.einsum("blv,bld->vd", g, x), rtol=1e-4, atol=1e-5)
    # without differentiation: the same sums
    total_eval, _ = jax.jit(loss)(x, w)
    np.testing.assert_allclose(float(total_eval), float(total), rtol=1e-6)


@pytest.mark.parametrize("weights", [[0.25, 0.125], [3.0, 2.0]])
def test_train_step_divides_by_the_true_total_weight(weights):
    """Sums over fractional weights (ranked pairs weigh 1/3 each) are divided by their total,
    also when it is below 1: the metrics and the SGD update are those of the weighted mean."""
    from flax import nnx

    from jaxllm.config import MeshConfig
    from jaxllm.sharding import make_mesh
    from jaxllm.training.state import create_train_state, to_global
    from jaxllm.training.step import make_train_step

    class Lin(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.array([1.0, -2.0]))

    def loss_fn(model, batch, key):
        per_row = (batch["x"] @ model.w[...]) ** 2
        w = batch["weight"]
        return jnp.sum(w * per_row), {"weight": jnp.sum(w), "big": jnp.sum(w * (per_row > 4))}

    x = np.array([[1.0, 2.0], [0.5, -1.0]], np.float32)
    w = np.array(weights, np.float32)
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    tx = optax.sgd(0.1)
    graphdef, state, shardings = create_train_state(Lin, tx, mesh, "dp", 0)
    step = make_train_step(graphdef, loss_fn, tx, lambda s: 0.1, shardings, mesh, "dp")
    batch = to_global({"x": x, "weight": w}, mesh)
    state, metrics = step(state, batch)

    w0 = np.array([1.0, -2.0])
    per_row = (x @ w0) ** 2
    np.testing.assert_allclose(float(metrics["loss"]), (w * per_row).sum() / w.sum(), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["big"]), (w * (per_row > 4)).sum() / w.sum())
    grad = (w[:, None] * 2 * (x @ w0)[:, None] * x).sum(0) / w.sum()
    np.testing.assert_allclose(np.asarray(state.params["w"][...]), w0 - 0.1 * grad, rtol=1e-6)


def test_loss_inputs_of_the_wrong_shape_fail_at_the_boundary():
    """chex shape checks: a mask for another batch is refused before any arithmetic."""
    logits, targets = jnp.zeros((2, 5, 7)), jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(AssertionError, match="shapes"):
        cross_entropy(logits, targets, jnp.ones((2, 4)))
    with pytest.raises(AssertionError):
        head_cross_entropy(jnp.zeros((2, 5, 3)), jnp.zeros((7, 4)), targets, jnp.ones((2, 5)))


def _polar(g: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(g, full_matrices=False)
    return u @ vt


def test_muon_orthogonalises_each_matrix_and_adamw_takes_the_rest():
    """One step from zero momentum on a scanned stack [2 layers, 32, 64] (the MLP's up), an
    unscanned q [32, 4, 8] and an embedding: each Muon matrix's update is 0.2 sqrt(max fan)
    times a near-orthogonal matrix close to the SVD's polar factor of its gradient (per layer,
    whatever the layers' scales), plus decoupled decay; the embedding gets AdamW's update."""
    rng = np.random.default_rng(0)

    def spread(shape):  # singular values from 1 to 100: far from orthogonal
        a = rng.normal(size=(shape[0], shape[0]))
        b = rng.normal(size=(shape[0], shape[1]))
        u, _ = np.linalg.qr(a)
        return u @ np.diag(np.geomspace(100, 1, shape[0])) @ np.linalg.qr(b.T)[0].T

    g_up = np.stack([spread((32, 64)), 1e-3 * spread((32, 64))])
    g_q = spread((32, 32)).reshape(32, 4, 8)
    params = {"blocks": {"mlp": {"up": rng.normal(size=(2, 32, 64))},
                         "attn": {"q": rng.normal(size=(32, 4, 8))}},
              "embed": {"embedding": rng.normal(size=(50, 32))}}  # fmt: skip
    grads = {"blocks": {"mlp": {"up": g_up}, "attn": {"q": g_q}},
             "embed": {"embedding": rng.normal(size=(50, 32))}}  # fmt: skip
    params, grads = (
        jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t) for t in (params, grads)
    )
    cfg = OptimConfig(name="muon", lr=0.5, warmup_steps=0, schedule="constant", grad_clip=0,
                      weight_decay=0.1)  # fmt: skip
    tx = make_optimizer(cfg, 10)
    upd, _ = tx.update(grads, tx.init(params), params)
    decay = lambda p: -0.5 * 0.1 * np.asarray(p)  # noqa: E731
    for u, g, p, fan in [
        (upd["blocks"]["mlp"]["up"][0], g_up[0], params["blocks"]["mlp"]["up"][0], 64),
        (upd["blocks"]["mlp"]["up"][1], g_up[1], params["blocks"]["mlp"]["up"][1], 64),
        (upd["blocks"]["attn"]["q"], g_q, params["blocks"]["attn"]["q"], 32),
    ]:
        o = (np.asarray(u) - decay(p)).reshape(32, -1) / (-0.5 * 0.2 * np.sqrt(fan))
        sv = np.linalg.svd(o, compute_uv=False)
        assert sv.min() > 0.5 and sv.max() < 1.3  # 1 to 100 before: flattened
        polar = _polar(np.asarray(g).reshape(32, -1))
        assert np.sum(o * polar) / (np.linalg.norm(o) * np.linalg.norm(polar)) > 0.95
    adamw = optax.adamw(0.5, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=0.1)
    emb = params["embed"]["embedding"]
    want, _ = adamw.update(grads["embed"]["embedding"], adamw.init(emb), emb)
    np.testing.assert_allclose(upd["embed"]["embedding"], want, rtol=1e-6)
