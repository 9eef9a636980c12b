"""The RL registries (policy losses, advantage estimators, TIS) against hand-written numpy, and
the default GRPO/PPO paths against arrays recorded from main's code before the refactor."""

import importlib.util
import typing
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config.rl import GRPOConfig
from jaxllm.trainers import advantages
from jaxllm.training import policy_losses, rl_losses
from jaxllm.training.policy_losses import LossParams

ROOT = Path(__file__).resolve().parents[2]


def _record_module():
    spec = importlib.util.spec_from_file_location("rec", ROOT / "scripts/record_rl_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_default_grpo_and_ppo_paths_equal_to_main():
    """Recorded at 2f50db7 (main, before the registry) by scripts/record_rl_reference.py, at
    XLA's default optimisation level (bit-identical there); the suite compiles at -O0
    (tests/conftest.py), which rounds a few values apart (GAE accumulates them to 5e-7)."""
    want = np.load(ROOT / "tests/training/data/rl_losses_main.npz")
    rec = _record_module()
    got = rec.compute(rec.inputs())
    assert set(got) == set(want.files)
    for k in want.files:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # The registry's names give the same arrays as the old spellings.
    x = rec.inputs()
    grpo = jax.jit(advantages.ADVANTAGES["grpo"], static_argnums=1)
    drgrpo = jax.jit(advantages.ADVANTAGES["drgrpo"], static_argnums=1)
    np.testing.assert_array_equal(np.asarray(grpo(x["rewards"], 4)), got["adv"])
    np.testing.assert_array_equal(np.asarray(drgrpo(x["rewards"], 4)), got["adv_nostd"])

    def explicit(lp):
        return rl_losses.grpo_loss(
            lp, x["old"], x["ref"], got["adv"], x["mask"], 0.2, 0.1, "k3", loss="ppo_clip"
        )

    (loss, _), grad = jax.jit(jax.value_and_grad(explicit, has_aux=True))(x["logp"])
    np.testing.assert_array_equal(np.asarray(loss), got["grpo_loss"])
    np.testing.assert_array_equal(np.asarray(grad), got["grpo_grad"])


def _data(seed=0, B=6, L=5):
    rng = np.random.default_rng(seed)
    logp = (rng.normal(size=(B, L)) * 0.5 - 1.5).astype(np.float32)
    old = (logp + rng.normal(size=(B, L)) * 0.4).astype(np.float32)
    adv = np.repeat(rng.normal(size=(B, 1)), L, axis=1).astype(np.float32)
    lengths = rng.integers(1, L + 1, size=B)
    mask = (np.arange(L)[None] < lengths[:, None]).astype(np.float32)
    return logp, old, adv, mask


def _run(name, logp, old, adv, mask, lo, hi):
    fn = policy_losses.POLICY_LOSSES[name]

    def total(lp):
        loss_BL, clip_BL = fn(lp, old, adv, mask, LossParams(lo, hi))
        return jnp.sum(loss_BL * mask), (loss_BL, clip_BL)

    (_, (loss_BL, clip_BL)), grad = jax.jit(jax.value_and_grad(total, has_aux=True))(logp)
    return np.asarray(loss_BL), np.asarray(clip_BL), np.asarray(grad)


def test_ppo_clip_and_dapo_match_numpy():
    logp, old, adv, mask = _data()
    r = np.exp(logp.astype(np.float64) - old)
    for name, lo, hi in (("ppo_clip", 0.2, 0.2), ("dapo", 0.2, 0.28)):
        loss, clip, grad = _run(name, logp, old, adv, mask, lo, hi if name == "dapo" else lo)
        rc = np.clip(r, 1 - lo, 1 + hi)
        want = -np.minimum(r * adv, rc * adv)
        np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(clip, ((r < 1 - lo) | (r > 1 + hi)).astype(np.float32))
        # d/dlogp: -r A where the unclipped branch is the min, else 0.
        unclipped = r * adv <= rc * adv
        np.testing.assert_allclose(grad, np.where(unclipped, -r * adv, 0) * mask, rtol=1e-5,
                                   atol=1e-6)  # fmt: skip
    # clip-higher: a ratio of 1.25 with A > 0 still has a gradient under dapo, not ppo_clip.
    lp, od = np.log(np.full((1, 1), 1.25, np.float32)), np.zeros((1, 1), np.float32)
    one = np.ones((1, 1), np.float32)
    assert _run("ppo_clip", lp, od, one, one, 0.2, 0.2)[2][0, 0] == 0
    assert _run("dapo", lp, od, one, one, 0.2, 0.28)[2][0, 0] < 0


def test_gspo_matches_numpy():
    logp, old, adv, mask = _data(1)
    lo, hi = 0.05, 0.08
    loss, clip, grad = _run("gspo", logp, old, adv, mask, lo, hi)
    for i in range(len(mask)):
        n = int(mask[i].sum())
        log_s = np.mean(logp[i, :n].astype(np.float64) - old[i, :n])
        s, a = np.exp(log_s), float(adv[i, 0])
        sc = np.clip(s, 1 - lo, 1 + hi)
        np.testing.assert_allclose(loss[i, :n], -min(s * a, sc * a), rtol=1e-5, atol=1e-6)
        assert np.all(clip[i, :n] == float(s < 1 - lo or s > 1 + hi))
        # The sequence loss sits on each of its n tokens: total n * (-s A); d/dlogp_t = -s A.
        g = -s * a if s * a <= sc * a else 0.0
        np.testing.assert_allclose(grad[i, :n], g, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(grad[i, n:], 0.0)


def test_cispo_matches_numpy_and_keeps_clipped_gradients():
    logp, old, adv, mask = _data(2)
    lo, hi = 0.9, 0.2
    loss, clip, grad = _run("cispo", logp, old, adv, mask, lo, hi)
    r = np.exp(logp.astype(np.float64) - old)
    w = np.clip(r, 1 - lo, 1 + hi)
    np.testing.assert_allclose(loss, -w * adv * logp, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(clip, ((r < 1 - lo) | (r > 1 + hi)).astype(np.float32))
    # The weight is a constant: d/dlogp = -w A on every live token, clipped or not.
    np.testing.assert_allclose(grad, -w * adv * mask, rtol=1e-5, atol=1e-6)
    assert np.all(grad[(clip > 0) & (mask > 0)] != 0)


def test_truncated_is_weights_match_numpy():
    rng = np.random.default_rng(3)
    old = rng.normal(size=(4, 6)).astype(np.float32)
    samp = (old + rng.normal(size=(4, 6))).astype(np.float32)
    got = np.asarray(jax.jit(policy_losses.truncated_is_weights, static_argnums=2)(old, samp, 2.0))
    np.testing.assert_allclose(got, np.minimum(np.exp(old.astype(np.float64) - samp), 2.0),
                               rtol=1e-6)  # fmt: skip
    # Weights scale the policy term only, and as constants.
    logp, oldp, adv, mask = _data(4, B=4, L=6)
    ref = logp - 0.1
    adv_B = adv[:, 0]

    def f(lp, w):
        return rl_losses.grpo_loss(lp, oldp, ref, adv_B, mask, 0.2, 0.0, is_weight_BL=w)[0]

    g1 = jax.grad(f)(logp, np.ones_like(logp))
    g2 = jax.grad(f)(logp, got)
    np.testing.assert_allclose(np.asarray(g2), np.asarray(g1) * got, rtol=1e-5, atol=1e-7)


def test_constant_norm_weight_and_metrics():
    logp, old, adv, mask = _data(5)
    ref = logp - 0.2
    loss_t, aux_t = rl_losses.grpo_loss(logp, old, ref, adv[:, 0], mask, 0.2, 0.1)
    loss_c, aux_c = rl_losses.grpo_loss(logp, old, ref, adv[:, 0], mask, 0.2, 0.1, constant_len=7)
    assert float(loss_c) == float(loss_t)  # same sum; only the divisor differs
    assert float(aux_c["weight"]) == mask.shape[0] * 7
    np.testing.assert_allclose(float(aux_c["kl"] / aux_c["weight"]),
                               float(aux_t["kl"] / aux_t["weight"]), rtol=1e-6)  # fmt: skip


GROUPS = np.array([1.0, 0.0, 0.0, 1.1, 0.5, 0.5, 0.5, 0.5, 0.0, 1.0, 1.0, 0.0], np.float32)


def test_rloo_matches_loop():
    got = np.asarray(jax.jit(advantages.rloo_advantages, static_argnums=1)(GROUPS, 4))
    want = []
    for g in range(3):
        r = GROUPS[4 * g : 4 * g + 4].astype(np.float64)
        for i in range(4):
            want.append(r[i] - (r.sum() - r[i]) / 3)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_reinforce_pp_matches_numpy():
    r = GROUPS.astype(np.float64)
    got = np.asarray(jax.jit(advantages.reinforce_pp_advantages, static_argnums=1)(GROUPS, 4))
    np.testing.assert_allclose(got, (r - r.mean()) / (r.std() + 1e-6), rtol=1e-5, atol=1e-6)
    base = jax.jit(advantages.reinforce_pp_baseline_advantages, static_argnums=1)
    c = (r.reshape(3, 4) - r.reshape(3, 4).mean(1, keepdims=True)).reshape(-1)
    np.testing.assert_allclose(np.asarray(base(GROUPS, 4)), c / (c.std() + 1e-6), rtol=1e-5,
                               atol=1e-6)  # fmt: skip


def test_dynamic_sampling_keep_and_overlong_penalty():
    keep = np.asarray(advantages.group_keep(jnp.asarray(GROUPS), 4))
    np.testing.assert_array_equal(keep, [1] * 4 + [0] * 4 + [1] * 4)
    lengths = np.array([10, 30, 31, 35, 39, 40], np.float32)
    got = np.asarray(advantages.overlong_penalty(jnp.asarray(lengths), 40, 10, 1.0))
    # DAPO eq. 13 with L_max 40, L_cache 10: 0 up to 30, then (30 - |y|) / 10, -1 at 40.
    want = [0.0 if n <= 30 else (30 - n) / 10 for n in lengths]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_config_names_are_the_registries():
    hints = typing.get_type_hints(GRPOConfig)
    names = {*advantages.ADVANTAGES, *advantages.PAIR_ADVANTAGES}
    assert set(typing.get_args(hints["advantage"])) == names
    assert set(typing.get_args(hints["loss"])) == set(policy_losses.POLICY_LOSSES)
    with pytest.raises(ValueError, match="policy loss 'nope'"):
        policy_losses.policy_loss("nope")


def test_ppo_policy_loss_with_tis_weights_matches_numpy():
    logp, old, adv, mask = _data(6)
    w = np.random.default_rng(7).uniform(0.5, 2.0, size=logp.shape).astype(np.float32)

    def f(lp, weight):
        return rl_losses.ppo_policy_loss(lp, old, adv, mask, 0.2, weight)[0]

    r = np.exp(logp.astype(np.float64) - old)
    per_tok = -np.minimum(r * adv, np.clip(r, 0.8, 1.2) * adv)
    np.testing.assert_allclose(float(f(logp, w)), np.sum(per_tok * w * mask), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.grad(f)(logp, w)),
                               np.asarray(jax.grad(f)(logp, None)) * w, rtol=1e-5, atol=1e-7)  # fmt: skip


def test_tis_cap_config_checks():
    from jaxllm.config.rl import PPOConfig

    for cls in (GRPOConfig, PPOConfig):
        with pytest.raises(ValueError, match="tis_cap"):
            cls(tis_cap=0.5)._validate()
        cls(tis_cap=0.0)._validate()
        cls(tis_cap=2.0)._validate()
