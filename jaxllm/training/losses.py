"""Pure loss functions. Each returns *sums* plus the weight they are a sum over, so gradient
accumulation and multi-device reduction stay exact (the step divides once at the end)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(
    logits_BLV: jax.Array, targets_BL: jax.Array, mask_BL: jax.Array, z_loss: float = 0.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Masked next-token cross-entropy, summed over tokens; `weight` = number of tokens.

    With `z_loss > 0` adds `z_loss * logsumexp(logits)^2` per token (PaLM), which keeps the
    softmax normaliser near 1 and the logits from drifting in low precision.
    """
    logits_BLV = logits_BLV.astype(jnp.float32)
    mask_BL = mask_BL.astype(jnp.float32)
    lse_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
    nll_BL = lse_BL - target_logit_BL
    ce = jnp.sum(nll_BL * mask_BL)
    zl = jnp.sum(jnp.square(lse_BL) * mask_BL)
    correct = jnp.sum((jnp.argmax(logits_BLV, axis=-1) == targets_BL) * mask_BL)
    total = ce + z_loss * zl if z_loss else ce
    return total, {"ce": ce, "z_loss": zl, "correct": correct, "weight": jnp.sum(mask_BL)}
