"""Policy losses for RL fine-tuning, one table (`POLICY_LOSSES`) looked up by name (`grpo.loss`).

Every entry has one signature, `loss(logp_BL, old_logp_BL, adv_BL, mask_BL, p) -> (loss_BL,
clipped_BL)`: the per-token loss to minimise (before masking and aggregation) and a 0/1
indicator of the tokens whose ratio left the trust region (logged as `clip_frac`). `p` is a
`LossParams`. The caller adds its KL term per token and sums over the mask; the step divides by
the token count (token-level mean over the minibatch, DAPO's choice) or, with
`loss_norm: constant`, by rows x max_new_tokens (Dr. GRPO's). The losses of `SEQUENCE_MEAN`
(gspo) are a mean over responses instead: `rl_losses.grpo_loss` weighs each token of response
i by 1 / |y_i| and the step divides by the number of responses. All math in f32; advantages
and the old log-probs are constants (stop-gradient).

`truncated_is_weights` is the sampler/learner correction (TIS) any of them can be multiplied by.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

sg = jax.lax.stop_gradient


@dataclass(frozen=True)
class LossParams:
    """Trust-region widths: the ratio is clipped to [1 - eps_low, 1 + eps_high]."""

    eps_low: float = 0.2
    eps_high: float = 0.2


def _f32(*xs: jax.Array) -> tuple[jax.Array, ...]:
    return tuple(jnp.asarray(x).astype(jnp.float32) for x in xs)


def _clip_min(ratio_BL, adv_BL, lo: float, hi: float) -> tuple[jax.Array, jax.Array]:
    """-min(r A, clip(r, lo, hi) A) and the [r outside (lo, hi)] indicator."""
    clipped_BL = jnp.clip(ratio_BL, lo, hi)
    loss_BL = -jnp.minimum(ratio_BL * adv_BL, clipped_BL * adv_BL)
    outside_BL = sg((ratio_BL < lo) | (ratio_BL > hi)).astype(jnp.float32)
    return loss_BL, outside_BL


def ppo_clip(logp_BL, old_logp_BL, adv_BL, mask_BL, p: LossParams):
    """PPO's clipped surrogate per token (Schulman et al. 2017, "Proximal Policy Optimization
    Algorithms", arXiv:1707.06347): -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A),
    r = pi / pi_old. Symmetric (eps_high = eps_low) unless `grpo.clip_eps_high` is set, the
    form GRPO (Shao et al. 2024, arXiv:2402.03300) inherits; an upper width of its own is
    DAPO's clip-higher (as TRL's `epsilon_high` on its standard loss). The op sequence is
    main's `_clipped_surrogate` (|r - 1| > eps is r - 1 > eps or 1 - r > eps exactly: 1 - r is
    -(r - 1) in floating point), so the default GRPO loss is bit-identical to before the
    registry (tested against recorded arrays)."""
    del mask_BL
    ratio_BL = jnp.exp(logp_BL - sg(old_logp_BL))
    clipped_BL = jnp.clip(ratio_BL, 1.0 - p.eps_low, 1.0 + p.eps_high)
    loss_BL = -jnp.minimum(ratio_BL * adv_BL, clipped_BL * adv_BL)
    is_clipped_BL = sg((ratio_BL - 1.0 > p.eps_high) | (1.0 - ratio_BL > p.eps_low))
    return loss_BL, is_clipped_BL.astype(jnp.float32)


def dapo(logp_BL, old_logp_BL, adv_BL, mask_BL, p: LossParams):
    """DAPO's decoupled clip ("clip-higher"; Yu et al. 2025, "DAPO: An Open-Source LLM
    Reinforcement Learning System at Scale", arXiv:2503.14476): the ratio is clipped to
    [1 - eps_low, 1 + eps_high] with eps_high > eps_low (paper: 0.2 / 0.28), so unlikely tokens
    with positive advantage can grow further and entropy does not collapse. Token-level mean over
    the batch is the step's default aggregation; DAPO's dynamic sampling and overlong reward
    shaping act on the rollouts (`dynamic_sampling_keep`, `overlong_penalty`). The same clip
    as `ppo_clip` with `clip_eps_high` set."""
    del mask_BL
    ratio_BL = jnp.exp(logp_BL - sg(old_logp_BL))
    return _clip_min(ratio_BL, adv_BL, 1.0 - p.eps_low, 1.0 + p.eps_high)


def gspo(logp_BL, old_logp_BL, adv_BL, mask_BL, p: LossParams):
    """GSPO: one importance ratio per sequence (Zheng et al. 2025, "Group Sequence Policy
    Optimization", arXiv:2507.18071): s_i = exp(mean over the response of log pi - log pi_old),
    the length-normalised sequence likelihood ratio, clipped to [1 - eps_low, 1 + eps_high]
    (the paper's widths are ~3e-4 / 4e-4: a sequence ratio moves far less than a token's).
    Each token carries its sequence's loss and clip indicator; the objective is their mean over
    responses, 1/G sum_i (eq. 5), which `grpo_loss` forms (it is in `SEQUENCE_MEAN`): a token
    mean would weigh response i by |y_i| / sum |y|."""
    live_BL = mask_BL > 0
    log_r_BL = jnp.where(live_BL, logp_BL - sg(old_logp_BL), 0.0)
    n_B = jnp.maximum(jnp.sum(mask_BL, axis=-1), 1.0)
    log_s_B = jnp.sum(log_r_BL * mask_BL, axis=-1) / n_B
    s_BL = jnp.broadcast_to(jnp.exp(log_s_B)[:, None], logp_BL.shape)
    return _clip_min(s_BL, adv_BL, 1.0 - p.eps_low, 1.0 + p.eps_high)


def cispo(logp_BL, old_logp_BL, adv_BL, mask_BL, p: LossParams):
    """CISPO (MiniMax 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning
    Attention", arXiv:2506.13585): -sg(clip(r, 1 - eps_low, 1 + eps_high)) A log pi. The IS
    weight is clipped and detached, never the gradient: every token keeps its REINFORCE
    gradient (PPO-clip drops the gradient of clipped tokens, often the rare "fork" tokens).
    The paper leaves the lower side effectively unclipped (eps_low large) and tunes eps_high."""
    del mask_BL
    ratio_BL = jnp.exp(logp_BL - sg(old_logp_BL))
    lo, hi = 1.0 - p.eps_low, 1.0 + p.eps_high
    w_BL = sg(jnp.clip(ratio_BL, lo, hi))
    outside_BL = sg((ratio_BL < lo) | (ratio_BL > hi)).astype(jnp.float32)
    return -w_BL * adv_BL * logp_BL, outside_BL


PolicyLoss = Callable[..., tuple[jax.Array, jax.Array]]
POLICY_LOSSES: dict[str, PolicyLoss] = {
    "ppo_clip": ppo_clip,
    "dapo": dapo,
    "gspo": gspo,
    "cispo": cispo,
}


# Losses whose objective is a mean over responses (each counts once, whatever its length),
# not over tokens: `grpo_loss` weighs their tokens by 1 / |y_i|.
SEQUENCE_MEAN = frozenset({"gspo"})


def policy_loss(name: str) -> PolicyLoss:
    """The registered loss `name`; an unknown name is one message listing the known ones."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"policy loss {name!r} is not one of {sorted(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


def truncated_is_weights(
    old_logp_BL: jax.Array, sampler_logp_BL: jax.Array, cap: float
) -> jax.Array:
    """Truncated importance sampling for sampler/learner mismatch (Yao et al. 2025, "Your
    Efficient RL Framework Secretly Brings You Off-Policy RL Training", fengyao.notion.site;
    after Espeholt et al. 2018's V-trace truncation): the rollouts were drawn by the sampler
    (another engine, a quantised or stale copy), the loss assumes the learner's pi_old, so
    each token's loss is weighted by min(pi_old / pi_sampler, cap), a constant. When both
    agree (jaxllm's in-process sampler: |gap| ~ 1e-6) every weight is ~1."""
    old_BL, samp_BL = _f32(old_logp_BL, sampler_logp_BL)
    return sg(jnp.minimum(jnp.exp(old_BL - samp_BL), cap))


def tis_fields(
    old_logp_BL: jax.Array, sampler_logp_BL: jax.Array, mask_BL: jax.Array, cap: float
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """A stage's post-rollout TIS: the minibatch field `is_weight` and the iteration's
    figures, `tis_weight` (mean weight over the response tokens) and `tis_truncated` (the
    share of tokens cut to `cap`)."""
    w_BL = truncated_is_weights(old_logp_BL, sampler_logp_BL, cap)
    mask_BL = mask_BL.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(mask_BL), 1.0)
    stats = {
        "tis_weight": jnp.sum(w_BL * mask_BL) / n,
        "tis_truncated": jnp.sum((w_BL >= cap) * mask_BL) / n,
    }
    return {"is_weight": w_BL}, stats
