"""GAE, whitening and GRPO group advantages against plain-python references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.trainers import advantages

# Jitted, as the trainers will call them; eager dispatch would also be slower here.
gae = jax.jit(advantages.gae)
whiten = jax.jit(advantages.whiten, static_argnames="shift_mean")
group_advantages = jax.jit(
    advantages.group_advantages, static_argnames=("group_size", "scale_by_std")
)


def gae_loop(rewards, values, length, gamma, lam):
    """Reference GAE for one row whose first `length` tokens are real; the episode ends there."""
    adv, ret = [0.0] * len(rewards), [0.0] * len(rewards)
    last = 0.0
    for t in reversed(range(length)):
        next_value = float(values[t + 1]) if t + 1 < length else 0.0
        delta = float(rewards[t]) + gamma * next_value - float(values[t])
        last = delta + gamma * lam * last
        adv[t], ret[t] = last, last + float(values[t])
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_matches_python_loop(gamma, lam):
    rng = np.random.default_rng(0)
    lengths = [6, 3, 0, 1, 5]
    b, t = len(lengths), 6
    rewards = rng.normal(size=(b, t)).astype(np.float32)
    values = rng.normal(size=(b, t)).astype(np.float32)
    mask = np.array([[j < n for j in range(t)] for n in lengths], np.float32)
    rewards[mask == 0] = np.nan  # garbage in padding must not leak into real tokens
    values[mask == 0] = 1e6
    adv, ret = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
    for i, n in enumerate(lengths):
        want_adv, want_ret = gae_loop(rewards[i], values[i], n, gamma, lam)
        np.testing.assert_allclose(np.asarray(adv[i]), want_adv, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(ret[i]), want_ret, rtol=1e-5, atol=1e-6)


def test_gae_lambda_one_gives_discounted_return_minus_value():
    # lam = 1: advantage = sum_k gamma^k r_{t+k} - V_t (Monte Carlo return minus baseline).
    rewards = np.array([[0.0, 0.0, 1.0, 0.0]], np.float32)
    values = np.array([[0.5, 0.2, 0.3, 9.0]], np.float32)
    mask = np.array([[1.0, 1.0, 1.0, 0.0]], np.float32)
    adv, ret = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), 0.9, 1.0)
    np.testing.assert_allclose(np.asarray(ret), [[0.81, 0.9, 1.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(adv), [[0.31, 0.7, 0.7, 0.0]], rtol=1e-6)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_uses_masked_statistics(shift_mean):
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(3, 5)) * 4 + 2).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], np.float32)
    x[mask == 0] = 1e4
    got = np.asarray(whiten(jnp.asarray(x), jnp.asarray(mask), shift_mean=shift_mean))
    vals = [float(x[i, j]) for i, j in np.ndindex(3, 5) if mask[i, j]]
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals) + 1e-8)
    for i, j in np.ndindex(3, 5):
        want = ((x[i, j] - mean) / std + (0 if shift_mean else mean)) if mask[i, j] else 0.0
        np.testing.assert_allclose(got[i, j], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_advantages_matches_loop(scale_by_std):
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, -1.0, 2.0, 0.0], np.float32)
    got = np.asarray(group_advantages(jnp.asarray(rewards), 4, scale_by_std=scale_by_std))
    for g in range(3):
        grp = [float(r) for r in rewards[4 * g : 4 * g + 4]]
        mean = sum(grp) / 4
        std = math.sqrt(sum((r - mean) ** 2 for r in grp) / 4)
        for k, r in enumerate(grp):
            want = (r - mean) / (std + 1e-6) if scale_by_std else r - mean
            np.testing.assert_allclose(got[4 * g + k], want, rtol=1e-5, atol=1e-6)
    assert np.all(got[4:8] == 0.0)  # identical rewards: no signal, and no division blow-up


def test_group_advantages_rejects_ragged_groups():
    with pytest.raises(ValueError, match="group_size=4"):
        advantages.group_advantages(jnp.zeros(6), 4)
