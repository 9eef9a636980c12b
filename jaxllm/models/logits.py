"""Functions of a model's output logits that both the sampler (`generation`) and the losses
(`training`) need, so that neither middle-layer package imports the other."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def temper(logits_V: jax.Array, temperature: float | jax.Array = 1.0) -> jax.Array:
    """logits / temperature in float32 (the distribution `sample_logits` draws from, before
    top-k / top-p). A temperature below 1e-6 divides by 1e-6 (0 is greedy: no distribution
    to speak of); a Python 1.0 returns the logits unchanged, a traced 1.0 divides by 1
    (exact), so temperature 1 is bit-identical to the raw model's logits either way."""
    logits_V = logits_V.astype(jnp.float32)
    if isinstance(temperature, int | float) and temperature == 1.0:
        return logits_V
    return logits_V / jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-6)
