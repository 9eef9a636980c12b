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
