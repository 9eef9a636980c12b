"""`grpo_loss`'s aggregation and clip widths against the papers' formulas written out in numpy:
GSPO is a mean over responses (Zheng et al. 2025, arXiv:2507.18071, eq. 5: 1/G sum_i, each
response once whatever its length), also when the batch is split into minibatches or
accumulated; `clip_eps_high` widens the upper side of the default `ppo_clip` too (DAPO's
clip-higher, arXiv:2503.14476)."""

import jax
import numpy as np
import pytest

from jaxllm.errors import ConfigError
from jaxllm.training.rl_losses import grpo_loss

LENS = np.array([7, 1, 4, 2, 0, 5])  # row 4: a dropped group's row (dynamic sampling)
B, T = len(LENS), 8
MASK = (np.arange(T)[None] < LENS[:, None]).astype(np.float32)
RNG = np.random.default_rng(0)
OLD = (RNG.normal(size=(B, T)) * 0.5 - 1.0).astype(np.float32)
LOGP = (OLD + RNG.normal(size=(B, T)) * 0.1).astype(np.float32)
REF = (OLD + RNG.normal(size=(B, T)) * 0.2).astype(np.float32)
ADV = np.array([1.2, -0.8, 0.5, -1.5, 0.9, 0.3], np.float32)


def _gspo_paper(lp, rows, lo, hi, beta=0.0):
    """GSPO eq. 5 over `rows` (responses with tokens): -1/G sum_i min(s_i A_i, clip(s_i) A_i),
    s_i = exp(mean_t (lp - old)), plus beta times each response's mean k3 KL; the gradient is
    hand-derived: d/dlp_t of response i is -s_i A_i / (G |y_i|) where the unclipped branch is the
    min, else 0 (the KL term's gradient, 1 - exp(ref - lp), per token, / (G |y_i|))."""
    lp, g = lp.astype(np.float64), len(rows)
    value, grad = 0.0, np.zeros_like(lp)
    for i in rows:
        n = LENS[i]
        s = np.exp(np.mean(lp[i, :n] - OLD[i, :n]))
        a = float(ADV[i])
        unclipped = s * a <= np.clip(s, 1 - lo, 1 + hi) * a
        value += -min(s * a, np.clip(s, 1 - lo, 1 + hi) * a) / g
        grad[i, :n] = (-s * a / (g * n)) if unclipped else 0.0
        d = REF[i, :n] - lp[i, :n]
        value += beta * np.mean(np.expm1(d) - d) / g
        grad[i, :n] += beta * (1 - np.exp(d)) / (g * n)
    return value, grad


@jax.jit
def _loss_and_grad(lp, old, ref, adv, mask, lo, hi, beta):
    def f(x):
        loss, aux = grpo_loss(x, old, ref, adv, mask, lo, beta, "k3", loss="gspo", eps_high=hi)
        return loss / aux["weight"], (loss, aux["weight"])

    return jax.value_and_grad(f, has_aux=True)(lp)


def _jax(rows, lo, hi, beta=0.0):
    """(loss sum, weight) of `grpo_loss` on `rows` and the gradient of loss sum / weight."""
    rows = list(rows)
    (_, (loss, weight)), g = _loss_and_grad(
        LOGP[rows], OLD[rows], REF[rows], ADV[rows], MASK[rows], lo, hi, beta
    )
    return float(loss), float(weight), np.asarray(g)


def test_gspo_is_a_mean_over_responses_value_and_gradient():
    live = [i for i in range(B) if LENS[i]]
    # wide widths: every response unclipped, the gradient is s_i A_i / (G |y_i|) exactly
    for lo, hi, beta in ((0.5, 0.5, 0.0), (0.5, 0.5, 0.1), (0.02, 0.03, 0.0)):
        loss, weight, g = _jax(range(B), lo, hi, beta)
        want_v, want_g = _gspo_paper(LOGP, live, lo, hi, beta)
        assert weight == len(live)  # the empty row is no response
        np.testing.assert_allclose(loss / weight, want_v, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g, want_g, rtol=1e-4, atol=1e-7)
    # the narrow widths clip some responses (no gradient) and keep others
    live_grad = np.abs(g[live]).sum(1) > 0
    assert live_grad.any() and not live_grad.all()


def test_gspo_minibatches_and_accumulation_keep_each_response_equal():
    lo = hi = 0.5
    halves = ([0, 1, 2], [3, 4, 5])  # lengths 7+1+4 and 2+0+5: unequal token counts
    parts = [_jax(rows, lo, hi) for rows in halves]
    for rows, (loss, weight, g) in zip(halves, parts):  # one optimizer step per minibatch
        live = [i for i in rows if LENS[i]]
        sub = {i: k for k, i in enumerate(rows)}
        want_v, want_g = _gspo_paper(LOGP, live, lo, hi)
        np.testing.assert_allclose(loss / weight, want_v, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g, want_g[[*sub]], rtol=1e-4, atol=1e-7)
    # gradient accumulation (train.grad_accum) adds the sums and divides once: the full mean
    live = [i for i in range(B) if LENS[i]]
    want_v, _ = _gspo_paper(LOGP, live, lo, hi)
    total = sum(p[0] for p in parts) / sum(p[1] for p in parts)
    np.testing.assert_allclose(total, want_v, rtol=1e-5, atol=1e-6)


def test_gspo_refuses_the_constant_token_normaliser():
    from jaxllm.config import from_dict, read_yaml

    from .conftest import ROOT

    raw = read_yaml(ROOT / "configs/tiny_grpo_gspo.yaml")
    from_dict(raw)  # the shipped config is fine
    raw["grpo"]["loss_norm"] = "constant"
    with pytest.raises(ConfigError, match="'grpo.loss_norm'.*gspo.*mean over responses"):
        from_dict(raw)
    with pytest.raises(ValueError, match="constant_len"):
        grpo_loss(LOGP, OLD, REF, ADV, MASK, 0.2, 0.0, loss="gspo", constant_len=8)


@pytest.mark.parametrize("loss", ["ppo_clip", "dapo"])
def test_clip_eps_high_widens_the_upper_side_of_ppo_clip(loss):
    r = np.array([[1.25, 1.3, 0.85, 0.75, 1.1, 0.7]], np.float32)
    adv = np.array([1.0], np.float32)
    lp = np.log(r) + np.zeros((2, 6), np.float32)  # row 0: A = 1, row 1: A = -1
    old, mask, a = np.zeros((2, 6), np.float32), np.ones((2, 6), np.float32), np.r_[adv, -adv]

    def f(x):
        return grpo_loss(x, old, old, a, mask, 0.2, 0.0, loss=loss, eps_high=0.28)

    (value, aux), g = jax.jit(jax.value_and_grad(f, has_aux=True))(lp)
    r2 = np.repeat(r, 2, 0).astype(np.float64)
    rc = np.clip(r2, 0.8, 1.28)  # the paper's [1 - eps_low, 1 + eps_high]
    per = -np.minimum(r2 * a[:, None], rc * a[:, None])
    np.testing.assert_allclose(float(value), per.sum(), rtol=1e-5, atol=1e-5)
    # d/dlogp = -r A where the unclipped branch is the min, else 0: 1.25 with A > 0 keeps its
    # gradient (a symmetric 0.2 clip would cut it)
    grad = np.where(r2 * a[:, None] <= rc * a[:, None], -r2 * a[:, None], 0.0)
    np.testing.assert_allclose(np.asarray(g), grad, rtol=1e-5, atol=1e-7)
    assert np.asarray(g)[0, 0] != 0
    outside = ((r2 < 0.8) | (r2 > 1.28)).sum()  # 1.3, 0.75, 0.7 in each row
    assert float(aux["clip_frac"]) == outside == 6
