"""Pure alignment losses: reward-model pairwise loss, the preference losses (DPO and its
variants, IPO, SimPO, ORPO, KTO), PPO (policy + value), GRPO and the KL estimators they share. Like
`losses.py`, each returns `(loss_sum, aux)` where aux holds *sums* of metrics and
`aux["weight"]` is what they sum over; the step divides once at the end. All math runs in f32
whatever the input dtype."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxllm.training.policy_losses import SEQUENCE_MEAN, LossParams, policy_loss, ppo_clip

_KL_KINDS = ("k1", "k2", "k3")


def _f32(*xs: jax.Array) -> tuple[jax.Array, ...]:
    return tuple(jnp.asarray(x).astype(jnp.float32) for x in xs)


def kl_estimate(logp_BL: jax.Array, ref_logp_BL: jax.Array, kind: str = "k3") -> jax.Array:
    """Per-token estimate of KL(pi || ref) for tokens sampled from pi (Schulman, "Approximating
    KL divergence"). With d = ref_logp - logp: k1 = -d (unbiased, high variance, can be
    negative); k2 = d^2 / 2 (biased, low variance); k3 = exp(d) - 1 - d (unbiased, >= 0).
    """
    if kind not in _KL_KINDS:
        raise ValueError(f"kl_estimate kind must be one of {_KL_KINDS}, got {kind!r}")
    logp_BL, ref_logp_BL = _f32(logp_BL, ref_logp_BL)
    d_BL = ref_logp_BL - logp_BL
    if kind == "k1":
        return -d_BL
    if kind == "k2":
        return 0.5 * jnp.square(d_BL)
    return jnp.expm1(d_BL) - d_BL


def _wins(gap_B: jax.Array) -> jax.Array:
    """1 where gap > 0, 0 where < 0, 1/2 on a tie: pair accuracy as the held-out figures count
    it (`trainers/pairs.pair_wins`), so an untrained model stands at 0.5 in both."""
    return (gap_B > 0).astype(jnp.float32) + 0.5 * (gap_B == 0).astype(jnp.float32)


def pairwise_loss(
    chosen_B: jax.Array,
    rejected_B: jax.Array,
    weight_B: jax.Array,
    margin_B: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Bradley-Terry reward-model loss: sum of -w * log sigmoid(r_chosen - r_rejected - margin).
    The optional margin (Llama 2) demands a larger gap for pairs rated far apart.
    aux sums: `accuracy` (w * ([rc > rr] + [rc = rr] / 2): a tie is half a win),
    `reward_gap` (w * (rc - rr)), `weight` (sum w).
    """
    chosen_B, rejected_B, weight_B = _f32(chosen_B, rejected_B, weight_B)
    gap_B = chosen_B - rejected_B
    shifted_B = gap_B if margin_B is None else gap_B - _f32(margin_B)[0]
    loss = -jnp.sum(weight_B * jax.nn.log_sigmoid(shifted_B))
    gap_B = jax.lax.stop_gradient(gap_B)
    return loss, {
        "accuracy": jnp.sum(weight_B * _wins(gap_B)),
        "reward_gap": jnp.sum(weight_B * gap_B),
        "weight": jnp.sum(weight_B),
    }


def _log1mexp(a_B: jax.Array) -> jax.Array:
    """log(1 - exp(a)) for a log-probability a < 0 (clamped just below 0: p = 1 exactly
    would make ORPO's odds infinite)."""
    return jnp.log(-jnp.expm1(jnp.minimum(a_B, -1e-6)))


def _smoothed(z_B: jax.Array, ls: float) -> jax.Array:
    """-(1 - ls) log sigmoid(z) - ls log sigmoid(-z): the sigmoid loss with a share ls of
    labels assumed flipped (conservative DPO)."""
    return -(1 - ls) * jax.nn.log_sigmoid(z_B) - ls * jax.nn.log_sigmoid(-z_B)


def _robust(z_B: jax.Array, ls: float) -> jax.Array:
    return (-(1 - ls) * jax.nn.log_sigmoid(z_B) + ls * jax.nn.log_sigmoid(-z_B)) / (1 - 2 * ls)


def _exo(a, b, beta, ls, gamma, tau):
    """EXO's pairwise loss: KL from the model's preference sigmoid(beta h) to the labels'
    (1 - eps, eps); eps = label_smoothing, 1e-3 when 0 (the paper's and TRL's)."""
    eps = ls or 1e-3
    z = beta * (a - b)
    return jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - jnp.log1p(-eps)) + jax.nn.sigmoid(-z) * (
        jax.nn.log_sigmoid(-z) - jnp.log(eps)
    )


def _discopop(rho, tau):
    """(1 - sigmoid(rho / tau)) (-log sigmoid(rho)) + sigmoid(rho / tau) exp(-rho), the second
    term as one exponential: finite however negative rho is (no inf times 0)."""
    exp_term = jnp.exp(jax.nn.log_sigmoid(rho / tau) - rho)
    return jax.nn.sigmoid(-rho / tau) * -jax.nn.log_sigmoid(rho) + exp_term


# Per-pair losses of the reference-based kinds, of the log-ratios a = pi_c - ref_c and
# b = pi_r - ref_r (the DPO margin h = a - b) and (beta, label_smoothing, gamma, tau); the rewards
# are beta (pi - ref). exo_pair to discopop are TRL's loss types of those names; tau is
# discopop's temperature.
_WITH_REFERENCE: dict[str, Callable[..., jax.Array]] = {
    "sigmoid": lambda a, b, beta, ls, gamma, tau: _smoothed(beta * (a - b), ls),
    "hinge": lambda a, b, beta, ls, gamma, tau: jax.nn.relu(1.0 - beta * (a - b)),
    "robust": lambda a, b, beta, ls, gamma, tau: _robust(beta * (a - b), ls),
    "ipo": lambda a, b, beta, ls, gamma, tau: jnp.square(a - b - 1.0 / (2.0 * beta)),
    "exo_pair": _exo,
    # NCA (Chen et al. 2024): each answer's own likelihood against the reference's, not only
    # their difference: the chosen one up, both pushed from above
    "nca_pair": lambda a, b, beta, ls, gamma, tau: (
        -jax.nn.log_sigmoid(beta * a)
        - 0.5 * jax.nn.log_sigmoid(-beta * a)
        - 0.5 * jax.nn.log_sigmoid(-beta * b)
    ),
    # APO (D'Oosterlinck et al. 2024): zero: the chosen answer's likelihood up and the
    # rejected one's down (for chosen answers better than the model's own); down: both down,
    # the rejected one more (for chosen answers worse than the model's)
    "apo_zero": lambda a, b, beta, ls, gamma, tau: (
        1.0 - jax.nn.sigmoid(beta * a) + jax.nn.sigmoid(beta * b)
    ),
    "apo_down": lambda a, b, beta, ls, gamma, tau: (
        jax.nn.sigmoid(beta * a) + 1.0 - jax.nn.sigmoid(beta * (a - b))
    ),
    # SPPO with hard labels (Wu et al. 2024): each log-ratio regressed to +-1 / (2 beta)
    "sppo_hard": lambda a, b, beta, ls, gamma, tau: (
        jnp.square(a - 0.5 / beta) + jnp.square(b + 0.5 / beta)
    ),
    # DiscoPOP (Chris Lu et al. 2024, the loss an LLM-driven search found): of rho = beta h,
    # the logistic loss blended into the exponential one by sigmoid(rho / tau)
    "discopop": lambda a, b, beta, ls, gamma, tau: _discopop(beta * (a - b), tau),
}


def _simpo(pi_c, pi_r, beta, ls, gamma, tau):
    return _smoothed(beta * (pi_c - pi_r) - gamma, ls), {}


def _orpo(pi_c, pi_r, beta, ls, gamma, tau):
    log_odds = (pi_c - pi_r) - (_log1mexp(pi_c) - _log1mexp(pi_r))
    return -pi_c - beta * jax.nn.log_sigmoid(log_odds), {"nll": -pi_c, "log_odds": log_odds}


# Reference-free kinds: (per-pair loss, extra metrics) of the averaged log-probs; the rewards
# are beta pi.
_REFERENCE_FREE: dict[str, Callable[..., tuple[jax.Array, dict[str, jax.Array]]]] = {
    "simpo": _simpo,
    "orpo": _orpo,
}
DPO_KINDS = (*_WITH_REFERENCE, *_REFERENCE_FREE)
REFERENCE_FREE = tuple(_REFERENCE_FREE)  # no reference model: its log-probs are None


def dpo_loss(
    pi_chosen_B: jax.Array,
    pi_rejected_B: jax.Array,
    ref_chosen_B: jax.Array | None,
    ref_rejected_B: jax.Array | None,
    beta: float,
    label_smoothing: float = 0.0,
    kind: str = "sigmoid",
    weight_B: jax.Array | None = None,
    gamma: float = 0.0,
    tau: float = 0.05,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Preference optimisation on sequence log-probs of the policy (pi) and, for the kinds
    that have one, a frozen reference (ref).

    With a reference, h = (pi_c - ref_c) - (pi_r - ref_r). `kind="sigmoid"` (DPO, Rafailov et
    al.): -(1 - ls) * log sigmoid(beta h) - ls * log sigmoid(-beta h); ls > 0 is conservative
    DPO, which assumes a fraction ls of preference labels are flipped. `kind="ipo"` (Azar et
    al.): (h - 1 / (2 beta))^2, which regresses the margin to a finite target instead of
    pushing it to infinity. `kind="hinge"` (SLiC, Zhao et al. 2023): max(0, 1 - beta h).
    `kind="robust"` (Chowdhury et al. 2024): the sigmoid loss made unbiased when a fraction
    eps = ls of labels is flipped, ((1 - eps) l(h) - eps l(-h)) / (1 - 2 eps) with
    l(h) = -log sigmoid(beta h). Also TRL's `exo_pair`, `nca_pair`, `apo_zero`, `apo_down` and
    `sppo_hard`, and `discopop` with temperature `tau` (`_WITH_REFERENCE` has their formulas
    and papers). Rewards: beta (pi - ref).

    Reference-free (`ref_*` None; pi are log-probs *averaged* over each answer's tokens, as
    for IPO: the caller's part): `kind="simpo"` (Meng et al. 2024): the sigmoid loss of
    z = beta (pi_c - pi_r) - gamma, gamma the target reward margin (label smoothing as DPO's);
    `kind="orpo"` (Hong et al. 2024): -pi_c - beta log sigmoid(log odds_c - log odds_r), the
    chosen answer's NLL per token plus beta (the paper's lambda) times the odds-ratio loss,
    odds = p / (1 - p) of p = exp(pi). Rewards: beta pi (TRL's, for both).

    The loss is a weighted sum over pairs. aux sums (weighted): `reward_chosen`,
    `reward_rejected`, `margin` (their difference: beta h with a reference, TRL's
    rewards/margins), `accuracy` ([margin > 0], a tie half a win), `weight`; ORPO adds `nll`
    and `log_odds`.
    """
    if kind not in DPO_KINDS:
        raise ValueError(f"dpo_loss kind must be one of {DPO_KINDS}, got {kind!r}")
    if (ref_chosen_B is None) != (kind in REFERENCE_FREE):
        raise ValueError(f"dpo_loss: {kind!r} takes reference log-probs only if it has a reference")
    pi_c, pi_r = _f32(pi_chosen_B, pi_rejected_B)
    w_B = jnp.ones_like(pi_c) if weight_B is None else _f32(weight_B)[0]
    if kind in REFERENCE_FREE:
        per_pair_B, extra = _REFERENCE_FREE[kind](pi_c, pi_r, beta, label_smoothing, gamma, tau)
        rc_B, rr_B = beta * pi_c, beta * pi_r
    else:
        ref_c, ref_r = jax.lax.stop_gradient(_f32(ref_chosen_B, ref_rejected_B))
        a_B, b_B = pi_c - ref_c, pi_r - ref_r
        per_pair_B, extra = _WITH_REFERENCE[kind](a_B, b_B, beta, label_smoothing, gamma, tau), {}
        rc_B, rr_B = beta * a_B, beta * b_B
    return jnp.sum(w_B * per_pair_B), _pair_aux(w_B, rc_B, rr_B, extra)


def _pair_aux(w_B, rc_B, rr_B, extra) -> dict[str, jax.Array]:
    """The preference losses' aux sums: rewards, margin, accuracy, weight, `extra` (per pair)."""
    rc_B, rr_B = jax.lax.stop_gradient(rc_B), jax.lax.stop_gradient(rr_B)
    return {
        "reward_chosen": jnp.sum(w_B * rc_B),
        "reward_rejected": jnp.sum(w_B * rr_B),
        "margin": jnp.sum(w_B * (rc_B - rr_B)),
        "accuracy": jnp.sum(w_B * _wins(rc_B - rr_B)),
        "weight": jnp.sum(w_B),
        **{k: jnp.sum(w_B * jax.lax.stop_gradient(v)) for k, v in extra.items()},
    }


def kto_loss(
    pi_B: jax.Array,
    ref_B: jax.Array,
    label_B: jax.Array,
    pi_mismatched_B: jax.Array,
    ref_mismatched_B: jax.Array,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    weight_B: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """KTO (Ethayarajh et al. 2024, eq. 6) of answers marked desirable (label 1) or not.

    With each answer's log-ratio r = pi - ref and the reference point z = max(0, weighted
    mean of pi - ref over the mismatched rows) — each prompt followed by another example's
    answer (`trainers/kto.add_mismatched_rows`), a batch estimate of KL(pi || ref) taken as
    a constant — an example's loss is lambda_D (1 - sigmoid(beta (r - z))) if desirable,
    lambda_U (1 - sigmoid(beta (z - r))) if not: desirable answers are raised above the
    reference point and undesirable ones pushed below it, each against the policy's drift
    rather than against another answer. Summed with the weights (0 on padding rows).
    aux sums: `reward_desirable` and `reward_undesirable` (beta r, scaled so that the step's
    division by `weight` gives their mean over the examples of that label), `kl` (z),
    `weight`.
    """
    pi_B, ref_B, label_B, pi_kl_B, ref_kl_B = _f32(
        pi_B, ref_B, label_B, pi_mismatched_B, ref_mismatched_B
    )
    w_B = jnp.ones_like(pi_B) if weight_B is None else _f32(weight_B)[0]
    total = jnp.maximum(jnp.sum(w_B), 1e-9)
    z = jnp.maximum(jnp.sum(w_B * (pi_kl_B - ref_kl_B)) / total, 0.0)
    z = jax.lax.stop_gradient(z)
    r_B = pi_B - jax.lax.stop_gradient(ref_B)
    good = desirable_weight * (1.0 - jax.nn.sigmoid(beta * (r_B - z)))
    bad = undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z - r_B)))
    loss_B = jnp.where(label_B > 0, good, bad)
    reward_B = jax.lax.stop_gradient(beta * r_B)
    aux = {"kl": z * jnp.sum(w_B), "weight": jnp.sum(w_B)}
    for name, side_B in (("desirable", label_B > 0), ("undesirable", label_B <= 0)):
        w_side = w_B * side_B
        aux[f"reward_{name}"] = (
            jnp.sum(w_side * reward_B) * total / jnp.maximum(jnp.sum(w_side), 1e-9)
        )
    return jnp.sum(w_B * loss_B), aux


def _clipped_surrogate(
    logp_BL: jax.Array, old_logp_BL: jax.Array, adv_BL: jax.Array, clip_eps: float
) -> tuple[jax.Array, jax.Array]:
    """Per-token PPO objective -min(r A, clip(r, 1-e, 1+e) A) and the |r - 1| > e indicator
    (the registry's `ppo_clip`)."""
    return ppo_clip(logp_BL, old_logp_BL, adv_BL, None, LossParams(clip_eps, clip_eps))


def ppo_policy_loss(
    logp_BL: jax.Array,
    old_logp_BL: jax.Array,
    adv_BL: jax.Array,
    mask_BL: jax.Array,
    clip_eps: float,
    is_weight_BL: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO clipped surrogate, token level, summed over the mask; `weight` = number of tokens.
    `is_weight_BL`: truncated IS weights (`policy_losses.truncated_is_weights`) that scale
    each token's loss as constants (None: unweighted, the op sequence of before).

    aux sums: `clip_frac` (tokens with |r - 1| > clip_eps, whether or not the clipped branch
    is the one min() picks), `approx_kl` = k3 estimate of KL(pi_old || pi) for tokens sampled
    from pi_old, i.e. (r - 1) - log r with r = pi / pi_old (non-negative, unbiased).
    """
    logp_BL, old_logp_BL, adv_BL, mask_BL = _f32(logp_BL, old_logp_BL, adv_BL, mask_BL)
    adv_BL = jax.lax.stop_gradient(adv_BL)
    loss_BL, is_clipped_BL = _clipped_surrogate(logp_BL, old_logp_BL, adv_BL, clip_eps)
    if is_weight_BL is not None:
        loss_BL = loss_BL * jax.lax.stop_gradient(_f32(is_weight_BL)[0])
    approx_kl_BL = kl_estimate(old_logp_BL, jax.lax.stop_gradient(logp_BL), "k3")
    return jnp.sum(loss_BL * mask_BL), {
        "clip_frac": jnp.sum(is_clipped_BL * mask_BL),
        "approx_kl": jnp.sum(approx_kl_BL * mask_BL),
        "weight": jnp.sum(mask_BL),
    }


def ppo_value_loss(
    values_BL: jax.Array,
    old_values_BL: jax.Array,
    returns_BL: jax.Array,
    mask_BL: jax.Array,
    clip: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped value loss 0.5 * max((v - R)^2, (v_old + clip(v - v_old, -c, c) - R)^2), summed
    over the mask: the value head may not move more than c from the rollout's estimate.
    aux sums: `value_clip_frac` (tokens where the clipped error is the larger, so the gradient
    is cut), `weight` (number of tokens).
    """
    v_BL, old_BL, ret_BL, mask_BL = _f32(values_BL, old_values_BL, returns_BL, mask_BL)
    old_BL, ret_BL = jax.lax.stop_gradient(old_BL), jax.lax.stop_gradient(ret_BL)
    v_clipped_BL = old_BL + jnp.clip(v_BL - old_BL, -clip, clip)
    err_BL = jnp.square(v_BL - ret_BL)
    err_clipped_BL = jnp.square(v_clipped_BL - ret_BL)
    loss_BL = 0.5 * jnp.maximum(err_BL, err_clipped_BL)
    clipped_BL = jax.lax.stop_gradient(err_clipped_BL > err_BL).astype(jnp.float32)
    return jnp.sum(loss_BL * mask_BL), {
        "value_clip_frac": jnp.sum(clipped_BL * mask_BL),
        "weight": jnp.sum(mask_BL),
    }


def grpo_loss(
    logp_BL: jax.Array,
    old_logp_BL: jax.Array,
    ref_logp_BL: jax.Array,
    adv_B: jax.Array,
    mask_BL: jax.Array,
    clip_eps: float,
    beta: float,
    kl_kind: str = "k3",
    *,
    loss: str = "ppo_clip",
    eps_high: float | None = None,
    is_weight_BL: jax.Array | None = None,
    constant_len: int = 0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO: a policy loss from the registry (`loss`, default PPO's clipped surrogate, with
    ratio widths clip_eps / eps_high) with each sequence's advantage broadcast to its tokens,
    times the truncated IS weights `is_weight_BL` if given, plus beta * kl_estimate(pi, ref) per
    token (the KL is a loss term, not folded into the reward, so `kl_kind` is k3 or k2: k1's
    gradient, grad log pi, is zero in expectation under pi and beta would do nothing). Summed
    over tokens with `weight` = number of tokens, i.e. token-level normalisation as in DAPO
    rather than the original per-sequence mean, so long answers are not down-weighted;
    `constant_len` > 0 makes `weight` rows x constant_len instead (Dr. GRPO, Liu et al. 2025,
    arXiv:2503.20783: no dependence on the lengths at all; the metric sums are rescaled so they
    still read as per-token means). A loss of `SEQUENCE_MEAN` (gspo) is a mean over responses
    instead, each counting once whatever its length (GSPO eq. 5, 1/G sum_i): each token of
    response i weighs 1 / |y_i| (the KL term too: its per-token mean) and `weight` is the number
    of responses with a token; sums, so minibatches and accumulation add up exactly;
    `constant_len` is refused there. aux sums: `kl` (unscaled), `clip_frac` (ratio outside the
    clip range), `weight`.
    """
    if kl_kind not in ("k2", "k3"):
        raise ValueError(
            f"grpo_loss kl_kind must be 'k3' or 'k2', got {kl_kind!r} (k1's gradient is zero "
            "in expectation when the KL is a loss term)"
        )
    per_response = loss in SEQUENCE_MEAN
    if per_response and constant_len:
        raise ValueError(f"grpo_loss: loss {loss!r} is a mean over responses, not tokens: "
                         "constant_len (loss_norm: constant) does not apply")  # fmt: skip
    logp_BL, old_logp_BL, ref_logp_BL, adv_B, mask_BL = _f32(
        logp_BL, old_logp_BL, ref_logp_BL, adv_B, mask_BL
    )
    adv_BL = jax.lax.stop_gradient(jnp.broadcast_to(adv_B[:, None], logp_BL.shape))
    params = LossParams(clip_eps, clip_eps if eps_high is None else eps_high)
    surr_BL, is_clipped_BL = policy_loss(loss)(logp_BL, old_logp_BL, adv_BL, mask_BL, params)
    if is_weight_BL is not None:
        surr_BL = surr_BL * jax.lax.stop_gradient(_f32(is_weight_BL)[0])
    kl_BL = kl_estimate(logp_BL, jax.lax.stop_gradient(ref_logp_BL), kl_kind)
    loss_BL = surr_BL + beta * kl_BL
    if per_response:  # token j of response i weighs 1 / |y_i|; the weight counts responses
        n_B = jnp.sum(mask_BL, axis=-1)
        mask_BL = mask_BL / jnp.maximum(n_B, 1.0)[:, None]
        weight = jnp.sum((n_B > 0).astype(jnp.float32))
    else:
        weight = jnp.sum(mask_BL)
    kl = jax.lax.stop_gradient(jnp.sum(kl_BL * mask_BL))
    clip_frac = jnp.sum(is_clipped_BL * mask_BL)
    if constant_len:
        # Dr. GRPO: divide by a constant; the metric sums are rescaled to stay per-token means.
        constant = jnp.float32(mask_BL.shape[0] * constant_len)
        scale = constant / jnp.maximum(weight, 1.0)
        kl, clip_frac, weight = kl * scale, clip_frac * scale, constant
    return jnp.sum(loss_BL * mask_BL), {"kl": kl, "clip_frac": clip_frac, "weight": weight}
