"""Heads that later stages put on a decoder backbone: a scalar per token (a PPO critic's
value) or per sequence (a reward model, read at the last real token).

`HeadParam` marks a head's weights: a subclass of `nnx.Param`, so full fine-tuning trains it
like any weight, and under LoRA the trainable filter `nnx.Any(nnx.LoRAParam, HeadParam)`
trains it next to the adapters (a new head must learn, whatever else is frozen).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.models.decoder import Decoder


class HeadParam(nnx.Param):
    """A weight of a task head on top of a decoder."""


class ScalarHead(nnx.Module):
    """`x_BLD → s_BL` (float32): a linear map of the final-norm features to one number."""

    def __init__(self, d_model: int, *, rngs: nnx.Rngs, std: float = 0.0):
        init = nnx.initializers.normal(std) if std > 0 else nnx.initializers.zeros
        w = init(rngs.params(), (d_model,), jnp.float32)
        self.kernel = HeadParam(w, out_sharding=("embed",))
        self.bias = HeadParam(jnp.zeros((), jnp.float32))

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        x = x_BLD.astype(jnp.float32)
        return jnp.einsum("bld,d->bl", x, self.kernel[...]) + self.bias[...]


class ScalarModel(nnx.Module):
    """A decoder with a scalar head: `model(tokens, ...) -> s_BL`, one number per position.
    The backbone stays reachable as `.decoder` (module paths `decoder.blocks.0.attn.q`)."""

    def __init__(self, decoder: Decoder, *, rngs: nnx.Rngs, std: float = 0.0):
        self.decoder = decoder
        self.head = ScalarHead(decoder.cfg.d_model, rngs=rngs, std=std)

    def __call__(self, tokens_BL: jax.Array, **kwargs) -> jax.Array:
        return self.head(self.decoder.features(tokens_BL, **kwargs))


def with_scalar_head(decoder: nnx.Module, rngs: nnx.Rngs) -> ScalarModel:
    """The `wrap` that `init_from_checkpoint` / `load_checkpoint_model` take for reward and
    value models (the head starts at zero: every score 0 before training)."""
    return ScalarModel(decoder, rngs=rngs)


def last_token_index(segment_ids_BL: jax.Array) -> jax.Array:
    """[B] index of each row's last real token (segment id > 0; 0 for an empty row)."""
    length = segment_ids_BL.shape[1]
    real_BL = segment_ids_BL > 0
    idx_BL = jnp.where(real_BL, jnp.arange(length)[None, :], -1)
    return jnp.maximum(jnp.max(idx_BL, axis=1), 0)
