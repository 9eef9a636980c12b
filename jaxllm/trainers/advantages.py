"""Advantage estimation for RL fine-tuning: GAE for PPO, group-relative advantages for GRPO,
and masked whitening. Pure jax, jit-able, f32 inside."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gae(
    rewards_BT: jax.Array,
    values_BT: jax.Array,
    mask_BT: jax.Array,
    gamma: float,
    lam: float,
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al. 2016) by a reverse `lax.scan`.

    `mask_BT` marks real response tokens (a right-padded prefix per row). The value after a
    row's last real token is 0 (the episode ends there), and padded positions get 0 advantage
    and 0 return. Returns (advantages_BT, returns_BT) with returns = advantages + values, the
    value-head target.
    """
    mask_BT = mask_BT.astype(jnp.float32)
    live_BT = mask_BT > 0
    # Padding may hold garbage (even NaN); zero it so it cannot leak into real tokens.
    rewards_BT = jnp.where(live_BT, rewards_BT.astype(jnp.float32), 0.0)
    values_BT = jnp.where(live_BT, values_BT.astype(jnp.float32), 0.0)

    def step(carry, xs):
        next_adv_B, next_value_B = carry
        r_B, v_B, live_B = xs
        delta_B = r_B + gamma * next_value_B - v_B
        adv_B = jnp.where(live_B, delta_B + gamma * lam * next_adv_B, 0.0)
        # A padded step resets the carry, so the last real token bootstraps from 0.
        return (adv_B, v_B), adv_B

    zeros_B = jnp.zeros(rewards_BT.shape[:1], jnp.float32)
    _, adv_TB = jax.lax.scan(
        step, (zeros_B, zeros_B), (rewards_BT.T, values_BT.T, live_BT.T), reverse=True
    )
    adv_BT = adv_TB.T
    return adv_BT, jnp.where(live_BT, adv_BT + values_BT, 0.0)


def whiten(
    x_BT: jax.Array, mask_BT: jax.Array, shift_mean: bool = True, eps: float = 1e-8
) -> jax.Array:
    """(x - mean) / sqrt(var + eps) with mean and (ddof=0) variance over masked entries only,
    so padding does not bias the statistics. `shift_mean=False` adds the mean back (scale
    only), as for rewards whose sign matters. Masked-out entries come back as 0.
    """
    x_BT = x_BT.astype(jnp.float32)
    mask_BT = mask_BT.astype(jnp.float32)
    live_BT = mask_BT > 0
    x_BT = jnp.where(live_BT, x_BT, 0.0)
    n = jnp.maximum(jnp.sum(mask_BT), 1.0)
    mean = jnp.sum(x_BT * mask_BT) / n
    var = jnp.sum(jnp.square(x_BT - mean) * mask_BT) / n
    out_BT = (x_BT - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out_BT = out_BT + mean
    return jnp.where(live_BT, out_BT, 0.0)


def group_advantages(
    rewards_N: jax.Array, group_size: int, eps: float = 1e-6, scale_by_std: bool = True
) -> jax.Array:
    """GRPO advantages: rewards laid out as consecutive groups of `group_size` completions of
    one prompt; each becomes (r - group mean) / (group std + eps), std with ddof=0 (population,
    as the group is the whole sample). `scale_by_std=False` keeps r - mean (Dr. GRPO), which
    avoids up-weighting groups that are nearly all right or all wrong.
    """
    n = rewards_N.shape[0]
    if group_size < 1 or n % group_size:
        raise ValueError(f"{n} rewards do not split into groups of group_size={group_size}")
    r_GK = rewards_N.astype(jnp.float32).reshape(n // group_size, group_size)
    adv_GK = r_GK - jnp.mean(r_GK, axis=-1, keepdims=True)
    if scale_by_std:
        adv_GK = adv_GK / (jnp.std(r_GK, axis=-1, keepdims=True) + eps)
    return adv_GK.reshape(n)


def _groups(rewards_N: jax.Array, group_size: int) -> jax.Array:
    n = rewards_N.shape[0]
    if group_size < 1 or n % group_size:
        raise ValueError(f"{n} rewards do not split into groups of group_size={group_size}")
    return rewards_N.astype(jnp.float32).reshape(n // group_size, group_size)


def grpo_advantages(rewards_N: jax.Array, group_size: int, eps: float = 1e-6) -> jax.Array:
    """GRPO (Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300): (r - group mean) / (group
    std + eps). The registry's `grpo`; main's `group_advantages` with `scale_by_std=True`."""
    return group_advantages(rewards_N, group_size, eps, scale_by_std=True)


def drgrpo_advantages(rewards_N: jax.Array, group_size: int) -> jax.Array:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical
    Perspective", arXiv:2503.20783): r - group mean, no division by the group std (which
    up-weights groups that are nearly all right or all wrong). Its other half, no division by
    the response length, is the loss's aggregation (`grpo.loss_norm: constant`)."""
    return group_advantages(rewards_N, group_size, scale_by_std=False)


def rloo_advantages(rewards_N: jax.Array, group_size: int) -> jax.Array:
    """RLOO (Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!"; Ahmadian
    et al. 2024, arXiv:2402.14740): each sample's baseline is the mean of the *other* K - 1
    rewards of its group, r_i - (sum_j r_j - r_i) / (K - 1), an unbiased baseline (it does not
    depend on the sample it scores); equal to K / (K - 1) x (r_i - group mean)."""
    r_GK = _groups(rewards_N, group_size)
    k = r_GK.shape[1]
    if k < 2:
        raise ValueError("rloo needs group_size >= 2 (a leave-one-out baseline)")
    others_GK = (jnp.sum(r_GK, axis=-1, keepdims=True) - r_GK) / (k - 1)
    return (r_GK - others_GK).reshape(-1)


def reinforce_pp_advantages(rewards_N: jax.Array, group_size: int, eps: float = 1e-6) -> jax.Array:
    """REINFORCE++ (Hu et al. 2025, "REINFORCE++: An Efficient RLHF Algorithm with Robustness
    to Both Prompt and Reward Models", arXiv:2501.03262), outcome reward: normalised over the
    whole (global) batch, (r - batch mean) / (batch std + eps), no per-prompt baseline, so it
    needs no groups; `group_size` is only checked. (Its KL-in-reward form is PPO's path.)"""
    r_N = _groups(rewards_N, group_size).reshape(-1)
    return (r_N - jnp.mean(r_N)) / (jnp.std(r_N) + eps)


def reinforce_pp_baseline_advantages(
    rewards_N: jax.Array, group_size: int, eps: float = 1e-6
) -> jax.Array:
    """REINFORCE++-baseline (same paper, for groups of samples per prompt): subtract the group
    mean, then divide by the std of those centred rewards over the whole batch (global, not
    per group: no up-weighting of near-unanimous groups)."""
    r_GK = _groups(rewards_N, group_size)
    c_N = (r_GK - jnp.mean(r_GK, axis=-1, keepdims=True)).reshape(-1)
    return c_N / (jnp.std(c_N) + eps)


# Sequence-reward estimators (rewards [N] in groups → advantages [N]), picked by `grpo.advantage`
# (`online_dpo` also takes the completions' log-ratios: `online_dpo_advantages`, beside them).
# GAE (`gae` above, Schulman et al. 2016, arXiv:1506.02438) is the critic-based estimator of
# `stage: ppo`: it takes per-token rewards and values, so it is not in this table.
ADVANTAGES = {
    "grpo": grpo_advantages,
    "drgrpo": drgrpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_advantages,
    "reinforce_pp_baseline": reinforce_pp_baseline_advantages,
}


def online_dpo_advantages(
    rewards_N: jax.Array, logratio_N: jax.Array, group_size: int, beta: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI
    Feedback", arXiv:2402.04792; TRL's OnlineDPOTrainer) as per-completion advantages: in
    each group the best and the worst completion by reward (the first of equals) form a pair
    (none when all rewards are equal), and with the log-ratio h = (pi - ref)_best -
    (pi - ref)_worst of the current policy (summed over each completion's tokens) the best
    gets +beta sigmoid(-beta h), the worst -beta sigmoid(-beta h), the rest 0. The policy
    gradient -sum_i A_i grad log pi(y_i) is then exactly the gradient of DPO's loss
    -log sigmoid(beta h) of those pairs (summed), wherever pi is still the policy that
    scored h: the first step on the rollouts. Returns (advantages [N], {`dpo_loss`: mean
    -log sigmoid(beta h), `pair_accuracy`: share with h > 0, both over the groups with a
    pair (0 in a batch without one), `pair_fraction`: share of groups with one})."""
    r_GK = _groups(rewards_N, group_size)
    lr_GK = logratio_N.astype(jnp.float32).reshape(r_GK.shape)
    best_G, worst_G = jnp.argmax(r_GK, axis=-1), jnp.argmin(r_GK, axis=-1)
    has_G = (jnp.max(r_GK, axis=-1) > jnp.min(r_GK, axis=-1)).astype(jnp.float32)
    take = lambda x_GK, i_G: jnp.take_along_axis(x_GK, i_G[:, None], axis=-1)[:, 0]  # noqa: E731
    h_G = take(lr_GK, best_G) - take(lr_GK, worst_G)
    coef_G = beta * jax.nn.sigmoid(-beta * h_G) * has_G
    k = r_GK.shape[1]
    pair_GK = jax.nn.one_hot(best_G, k) - jax.nn.one_hot(worst_G, k)
    adv_N = (jax.lax.stop_gradient(coef_G)[:, None] * pair_GK).reshape(-1)
    pairs = jnp.maximum(jnp.sum(has_G), 1.0)
    stats = {
        "dpo_loss": jnp.sum(-jax.nn.log_sigmoid(beta * h_G) * has_G) / pairs,
        "pair_accuracy": jnp.sum((h_G > 0) * has_G) / pairs,
        "pair_fraction": jnp.mean(has_G),
    }
    return adv_N, stats


# Estimators that also take each completion's log-ratio pi - ref (summed over its tokens)
# and DPO's beta: (rewards [N], log-ratios [N], group_size, beta) → (advantages [N], stats).
PAIR_ADVANTAGES = {"online_dpo": online_dpo_advantages}


def group_keep(rewards_N: jax.Array, group_size: int) -> jax.Array:
    """DAPO's dynamic sampling as a filter (Yu et al. 2025, arXiv:2503.14476): 1 for the rows
    of groups whose rewards differ, 0 for all-equal groups (all right or all wrong: zero
    advantage, they only dilute the token mean). DAPO then samples more prompts to refill the
    batch; here the batch just shrinks (the count is logged)."""
    r_GK = _groups(rewards_N, group_size)
    differ_G = jnp.max(r_GK, axis=-1) > jnp.min(r_GK, axis=-1)
    return jnp.repeat(differ_G.astype(jnp.float32), group_size)


def overlong_penalty(
    lengths_N: jax.Array, max_len: int, buffer: int, penalty: float = 1.0
) -> jax.Array:
    """DAPO's soft overlong punishment (arXiv:2503.14476, eq. 13), added to the reward: 0 up to
    max_len - buffer tokens, then falling linearly to -penalty at max_len (a response cut at
    max_len gets -penalty), so truncated answers are discouraged without a cliff."""
    start = max_len - buffer
    over_N = lengths_N.astype(jnp.float32) - start
    return -penalty * jnp.clip(over_N / buffer, 0.0, 1.0)
