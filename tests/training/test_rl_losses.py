"""Alignment losses (KL estimators, pairwise, DPO/IPO/SimPO/ORPO, PPO, GRPO) against numpy
references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.training import rl_losses

# Jitted once per shape: eager op-by-op dispatch compiles every primitive and is much slower.
kl_estimate = jax.jit(rl_losses.kl_estimate, static_argnames="kind")
pairwise_loss = jax.jit(rl_losses.pairwise_loss)
dpo_loss = jax.jit(rl_losses.dpo_loss, static_argnames=("beta", "label_smoothing", "kind", "gamma"))
ppo_policy_loss = jax.jit(rl_losses.ppo_policy_loss, static_argnames="clip_eps")
ppo_value_loss = jax.jit(rl_losses.ppo_value_loss, static_argnames="clip")
grpo_loss = jax.jit(rl_losses.grpo_loss, static_argnames=("clip_eps", "beta", "kl_kind"))


def np_log_sigmoid(x):
    return -np.log1p(np.exp(-x))


def test_kl_estimators_elementwise():
    rng = np.random.default_rng(0)
    logp = rng.normal(size=(3, 4)).astype(np.float32)
    ref = rng.normal(size=(3, 4)).astype(np.float32)
    lp, rf = logp.astype(np.float64), ref.astype(np.float64)
    want = {
        "k1": lp - rf,
        "k2": 0.5 * (lp - rf) ** 2,
        "k3": np.exp(rf - lp) - 1.0 - (rf - lp),
    }
    for kind, w in want.items():
        got = kl_estimate(jnp.asarray(logp), jnp.asarray(ref), kind=kind)
        np.testing.assert_allclose(np.asarray(got), w, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(kl_estimate(jnp.asarray(logp), jnp.asarray(ref), kind="k3")) >= 0)
    with pytest.raises(ValueError, match="k3"):
        rl_losses.kl_estimate(jnp.zeros(2), jnp.zeros(2), kind="k4")


def test_k1_k3_are_unbiased_for_true_kl():
    pi = np.array([0.5, 0.3, 0.15, 0.05])
    ref = np.array([0.25, 0.25, 0.25, 0.25])
    true_kl = float(np.sum(pi * np.log(pi / ref)))  # ~0.2044
    samples = np.random.default_rng(1).choice(4, size=200_000, p=pi)
    logp = jnp.asarray(np.log(pi)[samples], jnp.float32)
    ref_logp = jnp.asarray(np.log(ref)[samples], jnp.float32)
    for kind in ("k1", "k3"):
        est = float(jnp.mean(kl_estimate(logp, ref_logp, kind=kind)))
        # Monte Carlo: the standard error at 200k samples is ~2e-3 for both estimators.
        assert abs(est - true_kl) < 1e-2, (kind, est, true_kl)


def test_pairwise_loss_with_weights_and_margin():
    rng = np.random.default_rng(2)
    rc, rr = rng.normal(size=6).astype(np.float32), rng.normal(size=6).astype(np.float32)
    w = np.array([1.0, 0.5, 0.0, 2.0, 1.0, 1.0], np.float32)
    m = np.abs(rng.normal(size=6)).astype(np.float32)
    total, aux = pairwise_loss(jnp.asarray(rc), jnp.asarray(rr), jnp.asarray(w), jnp.asarray(m))
    want = sum(-w[i] * math.log(1 / (1 + math.exp(-(rc[i] - rr[i] - m[i])))) for i in range(6))
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    np.testing.assert_allclose(float(aux["accuracy"]), float(np.sum(w * (rc > rr))), rtol=1e-6)
    np.testing.assert_allclose(float(aux["reward_gap"]), float(np.sum(w * (rc - rr))), rtol=1e-5)
    assert float(aux["weight"]) == w.sum()
    no_margin, _ = pairwise_loss(jnp.asarray(rc), jnp.asarray(rr), jnp.asarray(w))
    want0 = float(np.sum(-w * np_log_sigmoid((rc - rr).astype(np.float64))))
    np.testing.assert_allclose(float(no_margin), want0, rtol=1e-5)


def test_pair_accuracy_counts_a_tie_as_half_a_win():
    """Training `accuracy` counts as the held-out pair accuracy does (`pairs.pair_wins`): a
    win 1, a loss 0, a tie 1/2 — so a zero reward head, or a DPO policy equal to its
    reference, stands at 0.5 in both."""
    rc = np.array([1.0, 0.0, -2.0, 0.5], np.float32)
    rr = np.array([0.0, 0.0, -1.0, 0.5], np.float32)  # win, tie, loss, tie
    w = np.array([1.0, 2.0, 1.0, 0.5], np.float32)
    want = (1.0 * 1 + 2.0 * 0.5 + 1.0 * 0 + 0.5 * 0.5) / w.sum()  # 2.25 / 4.5 = 0.5
    _, aux = pairwise_loss(jnp.asarray(rc), jnp.asarray(rr), jnp.asarray(w))
    assert float(aux["accuracy"]) / float(aux["weight"]) == pytest.approx(want)
    # DPO: pi_c - ref_c vs pi_r - ref_r, with ref = 0: the same four gaps
    zero = jnp.zeros(4)
    _, aux = dpo_loss(
        jnp.asarray(rc), jnp.asarray(rr), zero, zero, beta=0.1, weight_B=jnp.asarray(w)
    )
    assert float(aux["accuracy"]) / float(aux["weight"]) == pytest.approx(want)
    _, aux = dpo_loss(zero, zero, zero, zero, beta=0.1)  # policy == reference: all ties
    assert float(aux["accuracy"]) == 2.0 and float(aux["margin"]) == 0.0


def test_dpo_hand_case():
    # beta = 0.1; pi_c = -10, pi_r = -12, ref_c = ref_r = -11.
    # h = (-10 + 11) - (-12 + 11) = 2, beta * h = 0.2.
    # loss = -log sigmoid(0.2) = log(1 + e^-0.2) = log(1.8187307531) = 0.5981388693.
    # rewards: chosen 0.1 * 1 = 0.1, rejected 0.1 * -1 = -0.1, margin 0.2, accuracy 1.
    a = lambda x: jnp.array([x])  # noqa: E731
    total, aux = dpo_loss(a(-10.0), a(-12.0), a(-11.0), a(-11.0), beta=0.1)
    np.testing.assert_allclose(float(total), 0.5981388693, rtol=1e-6)
    np.testing.assert_allclose(float(aux["reward_chosen"]), 0.1, rtol=1e-5)
    np.testing.assert_allclose(float(aux["reward_rejected"]), -0.1, rtol=1e-5)
    np.testing.assert_allclose(float(aux["margin"]), 0.2, rtol=1e-5)
    assert float(aux["accuracy"]) == 1.0 and float(aux["weight"]) == 1.0


def _dpo_inputs(seed):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=5) * 3 - 20).astype(np.float32) for _ in range(4)]


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_dpo_sigmoid_label_smoothing_and_weights(ls):
    pc, pr, rc, rr = _dpo_inputs(3)
    w = np.array([1.0, 0.0, 2.0, 1.0, 0.5], np.float32)
    beta = 0.2
    total, aux = dpo_loss(
        *map(jnp.asarray, (pc, pr, rc, rr)), beta=beta, label_smoothing=ls, weight_B=jnp.asarray(w)
    )
    want, acc = 0.0, 0.0
    for i in range(5):
        z = beta * ((float(pc[i]) - float(rc[i])) - (float(pr[i]) - float(rr[i])))
        want += w[i] * (-(1 - ls) * math.log(1 / (1 + math.exp(-z))))
        want += w[i] * (-ls * math.log(1 / (1 + math.exp(z))))
        acc += w[i] * (z > 0)
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    np.testing.assert_allclose(float(aux["accuracy"]), acc, rtol=1e-6)
    chosen = float(np.sum(w * beta * (pc.astype(np.float64) - rc)))
    np.testing.assert_allclose(float(aux["reward_chosen"]), chosen, rtol=1e-5, atol=1e-6)
    assert float(aux["weight"]) == w.sum()


def test_ipo_loss_and_reference_gets_no_gradient():
    pc, pr, rc, rr = _dpo_inputs(4)
    beta = 0.5
    total, _ = dpo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), beta=beta, kind="ipo")
    h = (pc.astype(np.float64) - rc) - (pr.astype(np.float64) - rr)
    np.testing.assert_allclose(float(total), np.sum((h - 1 / (2 * beta)) ** 2), rtol=1e-5)
    grads = jax.jit(jax.grad(lambda *x: rl_losses.dpo_loss(*x, beta=0.1)[0], argnums=(2, 3)))(
        *map(jnp.asarray, (pc, pr, rc, rr))
    )
    assert all(np.all(np.asarray(g) == 0) for g in grads)


@pytest.mark.parametrize("kind,ls", [("hinge", 0.0), ("robust", 0.2)])
def test_hinge_and_robust_dpo_match_numpy(kind, ls):
    """SLiC's hinge max(0, 1 - beta h) and robust DPO ((1 - e) l(h) - e l(-h)) / (1 - 2e), l
    the sigmoid loss: per pair in float64, and robust's expectation over a label flipped with
    probability e is the clean sigmoid loss (its point: unbiased under that noise)."""
    pc, pr, rc, rr = _dpo_inputs(7)
    w = np.array([1.0, 0.0, 2.0, 1.0, 0.5], np.float32)
    beta = 0.3
    total, aux = dpo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), beta=beta, label_smoothing=ls,
                          kind=kind, weight_B=jnp.asarray(w))  # fmt: skip
    z = beta * ((pc.astype(np.float64) - rc) - (pr.astype(np.float64) - rr))
    if kind == "hinge":
        per = np.maximum(0.0, 1.0 - z)
    else:
        per = ((1 - ls) * -np_log_sigmoid(z) - ls * -np_log_sigmoid(-z)) / (1 - 2 * ls)
        flipped = ((1 - ls) * -np_log_sigmoid(-z) - ls * -np_log_sigmoid(z)) / (1 - 2 * ls)
        np.testing.assert_allclose((1 - ls) * per + ls * flipped, -np_log_sigmoid(z), rtol=1e-12)
    np.testing.assert_allclose(float(total), np.sum(w * per), rtol=1e-5)
    np.testing.assert_allclose(float(aux["margin"]), np.sum(w * z), rtol=1e-5)


def _np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


# the papers' per-pair losses in float64 of the log-ratios a (chosen) and b (rejected)
_PAPER_LOSSES = {
    # EXO (Ji et al. 2024, eq. 9 with K = 2): KL(p_model || p_label) over {chosen, rejected}
    "exo_pair": lambda a, b, beta, eps: sum(
        p * (np.log(p) - np.log(q))
        for p, q in ((_np_sigmoid(beta * (a - b)), 1 - eps), (_np_sigmoid(beta * (b - a)), eps))
    ),
    # NCA (Chen et al. 2024), pairwise: -log s(r_w) - 1/2 log s(-r_w) - 1/2 log s(-r_l)
    "nca_pair": lambda a, b, beta, eps: (
        -np_log_sigmoid(beta * a)
        - 0.5 * np_log_sigmoid(-beta * a)
        - 0.5 * np_log_sigmoid(-beta * b)
    ),
    # APO (D'Oosterlinck et al. 2024, eqs. 7 and 8)
    "apo_zero": lambda a, b, beta, eps: 1 - _np_sigmoid(beta * a) + _np_sigmoid(beta * b),
    "apo_down": lambda a, b, beta, eps: _np_sigmoid(beta * a) + 1 - _np_sigmoid(beta * (a - b)),
    # SPPO (Wu et al. 2024) with hard labels P(y_w > pi) = 1, P(y_l > pi) = 0, eta = 1 / beta
    "sppo_hard": lambda a, b, beta, eps: (
        (a - (1 / beta) * (1 - 0.5)) ** 2 + (b - (1 / beta) * (0 - 0.5)) ** 2
    ),
    # DiscoPOP (Lu et al. 2024, eq. 4, "LRML") at its temperature tau = 0.05
    "discopop": lambda a, b, beta, eps: _np_discopop(beta * (a - b), 0.05),
}


def _np_discopop(rho, tau):
    mix = _np_sigmoid(rho / tau)
    return (1 - mix) * -np_log_sigmoid(rho) + mix * np.exp(-rho)


def test_discopop_temperature_and_far_margins():
    """tau reaches the loss; a margin far below 0 (where exp(-rho) overflows f32 and the
    naive blend is inf * 0) gives a finite loss and gradient, the logistic term's."""
    a = jnp.array([0.3, -0.2, 1.5], jnp.float32)
    zero = jnp.zeros(3, jnp.float32)
    got = rl_losses.dpo_loss(a, zero, zero, zero, 0.5, kind="discopop", tau=0.2)[0]
    want = _np_discopop(0.5 * np.asarray(a, np.float64), 0.2).sum()
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    far = jnp.array([-1000.0], jnp.float32)
    fn = lambda c: rl_losses.dpo_loss(c, zero[:1], zero[:1], zero[:1], 0.5, kind="discopop")[0]  # noqa: E731
    loss, grad = jax.value_and_grad(fn)(far)
    assert float(loss) == pytest.approx(500.0, rel=1e-6)  # -log sigmoid(-500)
    assert float(grad[0]) == pytest.approx(-0.5, rel=1e-6)


@pytest.mark.parametrize(
    ("kind", "ls"), [(k, 0.0) for k in sorted(_PAPER_LOSSES)] + [("exo_pair", 0.05)]
)
def test_trl_loss_types_match_their_papers(kind, ls):
    """exo_pair, nca_pair, apo_zero, apo_down, sppo_hard and discopop against the papers' formulas
    (numpy, float64), weighted sums and gradients (central differences of the numpy loss);
    EXO's eps is label_smoothing, 1e-3 when 0."""
    pc, pr, rc, rr = (x / 10 + 2 for x in _dpo_inputs(9))  # log-ratios of a few tenths
    w = np.array([1.0, 0.0, 2.0, 1.0, 0.5], np.float32)
    beta = 0.7
    fn = lambda c, r: rl_losses.dpo_loss(  # noqa: E731
        c, r, jnp.asarray(rc), jnp.asarray(rr), beta, ls, kind, jnp.asarray(w)
    )
    (total, aux), (g_c, g_r) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(
        jnp.asarray(pc), jnp.asarray(pr)
    )
    ref = lambda c, r: _PAPER_LOSSES[kind](c - rc, r - rr, beta, ls or 1e-3)  # noqa: E731
    c64, r64 = pc.astype(np.float64), pr.astype(np.float64)
    np.testing.assert_allclose(float(total), np.sum(w * ref(c64, r64)), rtol=1e-5)
    d = 1e-4
    want_c = w * (ref(c64 + d, r64) - ref(c64 - d, r64)) / (2 * d)
    want_r = w * (ref(c64, r64 + d) - ref(c64, r64 - d)) / (2 * d)
    np.testing.assert_allclose(np.asarray(g_c), want_c, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g_r), want_r, rtol=1e-3, atol=1e-5)
    margin = beta * ((c64 - rc) - (r64 - rr))
    np.testing.assert_allclose(float(aux["margin"]), np.sum(w * margin), rtol=1e-5)


def _avg_logps(seed):
    """Length-averaged log-probs per token of 6 pairs (chosen, rejected): -0.2 to -4."""
    rng = np.random.default_rng(seed)
    return [-rng.uniform(0.2, 4.0, size=6).astype(np.float32) for _ in range(2)]


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_simpo_loss_and_gradient_match_numpy(ls):
    """SimPO (Meng et al. 2024): -log sigmoid(beta (a_c - a_r) - gamma) on averaged log-probs,
    no reference; d/d a_c = -beta sigmoid(-z) (ls = 0), rewards beta a."""
    ac, ar = _avg_logps(5)
    w = np.array([1.0, 0.0, 2.0, 1.0, 0.5, 1.0], np.float32)
    beta, gamma = 2.0, 0.8
    fn = lambda c, r: rl_losses.dpo_loss(c, r, None, None, beta, ls, "simpo", jnp.asarray(w), gamma)  # noqa: E731
    (total, aux), (g_c, g_r) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(
        jnp.asarray(ac), jnp.asarray(ar)
    )
    z = beta * (ac.astype(np.float64) - ar) - gamma
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    want = -(1 - ls) * np.log(sig(z)) - ls * np.log(sig(-z))
    np.testing.assert_allclose(float(total), np.sum(w * want), rtol=1e-5)
    # d per-pair / dz = -(1 - ls) sigmoid(-z) + ls sigmoid(z); dz / d a_c = beta = -dz / d a_r
    dz = -(1 - ls) * sig(-z) + ls * sig(z)
    np.testing.assert_allclose(np.asarray(g_c), w * beta * dz, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g_r), -w * beta * dz, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(aux["margin"]), np.sum(w * beta * (ac - ar)), rtol=1e-5)
    np.testing.assert_allclose(float(aux["accuracy"]), np.sum(w * (ac > ar)), rtol=1e-6)


def test_orpo_loss_is_nll_plus_the_odds_ratio_term():
    """ORPO (Hong et al. 2024): -a_c - lambda log sigmoid(log odds_c - log odds_r), odds
    p / (1 - p) of p = exp(a) the answer's mean per-token probability; numpy in float64, and
    the gradient against central differences of that numpy loss."""
    ac, ar = _avg_logps(6)
    lam = 0.25

    def np_orpo(c, r):
        c, r = np.asarray(c, np.float64), np.asarray(r, np.float64)
        odds = lambda a: np.exp(a) / (1 - np.exp(a))  # noqa: E731
        ratio = np.log(odds(c)) - np.log(odds(r))
        return -c - lam * -np.log1p(np.exp(-ratio)), ratio

    fn = lambda c, r: rl_losses.dpo_loss(c, r, None, None, lam, kind="orpo")  # noqa: E731
    (total, aux), g_c = jax.jit(jax.value_and_grad(fn, has_aux=True))(
        jnp.asarray(ac), jnp.asarray(ar)
    )
    per, ratio = np_orpo(ac, ar)
    np.testing.assert_allclose(float(total), per.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(aux["nll"]), -ac.astype(np.float64).sum(), rtol=1e-6)
    np.testing.assert_allclose(float(aux["log_odds"]), ratio.sum(), rtol=1e-4)
    eps = 1e-5
    c64 = ac.astype(np.float64)
    numeric = (np_orpo(c64 + eps, ar)[0] - np_orpo(c64 - eps, ar)[0]) / (2 * eps)
    np.testing.assert_allclose(np.asarray(g_c), numeric, rtol=1e-4)
    # p -> 1 (a = 0): finite loss and gradient
    loss0, g0 = jax.value_and_grad(lambda c: fn(c, jnp.asarray(ar))[0])(jnp.zeros(6))
    assert np.isfinite(float(loss0)) and np.all(np.isfinite(np.asarray(g0)))


def test_reference_free_kinds_take_no_reference_and_the_others_need_one():
    a = jnp.array([-1.0])
    with pytest.raises(ValueError, match="'simpo' takes reference log-probs only if"):
        rl_losses.dpo_loss(a, a, a, a, 1.0, kind="simpo")
    with pytest.raises(ValueError, match="'sigmoid' takes reference log-probs only if"):
        rl_losses.dpo_loss(a, a, None, None, 1.0)


def test_ppo_policy_loss_hand_case():
    # ratios r = [1.5, 0.9, 1.0, 0.5, 3.0 (masked)], advantages A = [1, -1, 2, -1, 5], eps 0.2:
    #   1.5 * 1 vs 1.2 * 1 -> min 1.2  -> loss -1.2, clipped (|0.5| > 0.2), gradient 0
    #   0.9 * -1 (inside the band)     -> loss  0.9, gradient -r A = 0.9
    #   1.0 * 2                         -> loss -2.0, gradient -2
    #   0.5 * -1 vs 0.8 * -1 -> min -0.8 -> loss 0.8, clipped, gradient 0
    # sum = -1.5, clip_frac = 2, weight = 4.
    r = np.array([[1.5, 0.9, 1.0, 0.5, 3.0]], np.float32)
    logp, old = jnp.asarray(np.log(r)), jnp.zeros((1, 5))
    adv = jnp.array([[1.0, -1.0, 2.0, -1.0, 5.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 1.0, 0.0]])
    total, aux = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    np.testing.assert_allclose(float(total), -1.5, rtol=1e-6)
    assert float(aux["clip_frac"]) == 2.0 and float(aux["weight"]) == 4.0
    kl = sum(x - 1 - math.log(x) for x in [1.5, 0.9, 1.0, 0.5])
    np.testing.assert_allclose(float(aux["approx_kl"]), kl, rtol=1e-5)
    loss = lambda lp: rl_losses.ppo_policy_loss(lp, old, adv, mask, 0.2)[0]  # noqa: E731
    g = jax.jit(jax.grad(loss))(logp)
    np.testing.assert_allclose(np.asarray(g), [[0.0, 0.9, -2.0, 0.0, 0.0]], atol=1e-6)


def test_ppo_value_loss_hand_case_and_numpy():
    # c = 0.2, old = 0.5 everywhere:
    #   v 1, R 1: (0)^2 vs (0.7 - 1)^2 = 0.09 -> 0.045, clipped error larger
    #   v 3, R 0: 9 vs (0.7)^2 = 0.49      -> 4.5
    #   v 0, R 2: 4 vs (0.3 - 2)^2 = 2.89  -> 2.0
    # sum = 6.545, value_clip_frac = 1.
    v, old, ret = jnp.array([[1.0, 3.0, 0.0]]), jnp.full((1, 3), 0.5), jnp.array([[1.0, 0, 2]])
    total, aux = ppo_value_loss(v, old, ret, jnp.ones((1, 3)), clip=0.2)
    np.testing.assert_allclose(float(total), 6.545, rtol=1e-6)
    assert float(aux["value_clip_frac"]) == 1.0 and float(aux["weight"]) == 3.0

    rng = np.random.default_rng(5)
    v, old, ret = (rng.normal(size=(3, 6)).astype(np.float32) for _ in range(3))
    mask = (rng.random((3, 6)) > 0.3).astype(np.float32)
    total, aux = ppo_value_loss(*map(jnp.asarray, (v, old, ret, mask)), clip=0.3)
    want, frac = 0.0, 0.0
    for i, j in np.ndindex(3, 6):
        vc = old[i, j] + min(max(v[i, j] - old[i, j], -0.3), 0.3)
        a, b = (float(v[i, j]) - ret[i, j]) ** 2, (float(vc) - ret[i, j]) ** 2
        want += mask[i, j] * 0.5 * max(a, b)
        frac += mask[i, j] * (b > a)
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    assert float(aux["value_clip_frac"]) == frac


@pytest.mark.parametrize("kl_kind", ["k2", "k3"])
def test_grpo_loss_matches_numpy(kl_kind):
    rng = np.random.default_rng(6)
    b, seq, eps, beta = 4, 7, 0.2, 0.05
    old = (rng.normal(size=(b, seq)) - 2).astype(np.float32)
    logp = (old + 0.3 * rng.normal(size=(b, seq))).astype(np.float32)
    ref = (old + 0.3 * rng.normal(size=(b, seq))).astype(np.float32)
    adv = rng.normal(size=b).astype(np.float32)
    lengths = [7, 3, 5, 1]
    mask = np.array([[j < n for j in range(seq)] for n in lengths], np.float32)
    args = map(jnp.asarray, (logp, old, ref, adv, mask))
    total, aux = grpo_loss(*args, clip_eps=eps, beta=beta, kl_kind=kl_kind)
    want = kl_sum = clips = 0.0
    for i in range(b):
        for j in range(lengths[i]):
            lp, o, rf = float(logp[i, j]), float(old[i, j]), float(ref[i, j])
            r = math.exp(lp - o)
            surr = -min(r * adv[i], min(max(r, 1 - eps), 1 + eps) * adv[i])
            kl = 0.5 * (rf - lp) ** 2 if kl_kind == "k2" else math.exp(rf - lp) - 1 - (rf - lp)
            want += surr + beta * kl
            kl_sum += kl
            clips += abs(r - 1) > eps
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    np.testing.assert_allclose(float(aux["kl"]), kl_sum, rtol=1e-5, atol=1e-6)
    assert float(aux["clip_frac"]) == clips and float(aux["weight"]) == sum(lengths)


def test_grpo_loss_rejects_k1():
    # the KL is a loss term in GRPO: grad k1 = grad log pi, zero in expectation under pi
    x = jnp.zeros((1, 2))
    with pytest.raises(ValueError, match="k1's gradient is zero in expectation"):
        rl_losses.grpo_loss(x, x, x, jnp.zeros(1), jnp.ones((1, 2)), 0.2, 0.1, "k1")


def test_grpo_gradient_on_policy():
    # With pi == pi_old the ratio is 1 (inside the band): d/dlogp = -A + beta (1 - e^(ref - logp)).
    rng = np.random.default_rng(7)
    logp = (rng.normal(size=(2, 3)) - 1).astype(np.float32)
    ref = (logp + 0.2 * rng.normal(size=(2, 3))).astype(np.float32)
    adv, mask, beta = np.array([0.7, -1.3], np.float32), np.ones((2, 3), np.float32), 0.1
    loss = lambda lp: rl_losses.grpo_loss(  # noqa: E731
        lp, jnp.asarray(logp), jnp.asarray(ref), jnp.asarray(adv), jnp.asarray(mask), 0.2, beta
    )[0]
    g = jax.jit(jax.grad(loss))(jnp.asarray(logp))
    want = -adv[:, None] + beta * (1 - np.exp(ref.astype(np.float64) - logp))
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shift", [0.3, -0.3])  # the mismatched rows' drift: z > 0, clamped
def test_kto_loss_and_gradient_match_the_paper(shift):
    """KTO (Ethayarajh et al. 2024, eq. 6) in numpy, float64: lambda_D (1 - sigmoid(beta (r -
    z))) for a desirable answer, lambda_U (1 - sigmoid(beta (z - r))) for an undesirable one,
    z = max(0, weighted mean drift pi - ref of the mismatched rows), a constant: no gradient
    reaches those rows or the reference."""
    pi, ref_lp, _, ref_kl = _dpo_inputs(4)
    pi_kl = (ref_kl + shift + np.random.default_rng(3).normal(0, 0.1, 5)).astype(np.float32)
    label = np.array([1, 0, 1, 0, 1], np.int32)
    w = np.array([1.0, 0.0, 2.0, 1.0, 0.5], np.float32)
    beta, lam_d, lam_u = 0.7, 1.3, 0.9
    z = max(0.0, np.sum(w * (pi_kl.astype(np.float64) - ref_kl)) / w.sum())
    assert (z > 0) == (shift > 0)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731

    def ref(p):
        r = p - ref_lp
        return np.where(
            label > 0, lam_d * (1 - sig(beta * (r - z))), lam_u * (1 - sig(beta * (z - r)))
        )

    def fn(p, kl):
        return rl_losses.kto_loss(p, jnp.asarray(ref_lp), jnp.asarray(label), kl,
                                  jnp.asarray(ref_kl), beta, lam_d, lam_u, jnp.asarray(w))  # fmt: skip

    grad = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))
    (total, aux), (g_pi, g_kl) = grad(jnp.asarray(pi), jnp.asarray(pi_kl))
    p64 = pi.astype(np.float64)
    np.testing.assert_allclose(float(total), np.sum(w * ref(p64)), rtol=1e-5)
    d = 1e-4
    want = w * (ref(p64 + d) - ref(p64 - d)) / (2 * d)
    np.testing.assert_allclose(np.asarray(g_pi), want, rtol=1e-3, atol=1e-6)
    assert not np.asarray(g_kl).any()
    W = float(aux["weight"])
    np.testing.assert_allclose(float(aux["kl"]) / W, z, rtol=1e-5, atol=1e-7)
    reward = beta * (p64 - ref_lp)
    for name, side in (("desirable", label > 0), ("undesirable", label == 0)):
        mean = np.sum(w * side * reward) / np.sum(w * side)  # over that label's examples
        np.testing.assert_allclose(float(aux[f"reward_{name}"]) / W, mean, rtol=1e-5)
