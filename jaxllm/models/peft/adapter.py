"""Bottleneck adapters (Houlsby et al. 2019) after the attention and MLP sublayers.

Each adapter maps a sublayer's output `h` [.., D] to `h + up(gelu(h down + b_down)) + b_up`
through a bottleneck of width m (`peft.adapter_dim`) and is added residually, before the
block adds its skip connection (decoder, pre-LN) or applies its LayerNorm (BERT's post-LN
block): where the paper places them. `up` and its bias start at zero, so the adapted model
starts exactly at the base model. Parameters: 2·d·m + d + m per adapter, two per layer (the
paper also trains the LayerNorms; here they stay frozen). Adapters cannot be merged into
the base weights (the GELU sits between them): `strip_adapters` removes them, giving the
base model back.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import PeftConfig
from jaxllm.models.layers import ParamKeys, dense
from jaxllm.models.scan import LAYERS

SUBLAYERS = ("attn_adapter", "mlp_adapter")


class AdapterParam(nnx.Param):
    """A weight of a bottleneck adapter."""


class Bottleneck(nnx.Module):
    """`h + up(gelu(h down + b_down)) + b_up` over the last axis, D → m → D. With `layers`,
    every weight has a leading `layers` axis (a scanned model's stacked block)."""

    def __init__(
        self,
        d: int,
        m: int,
        dtype: jnp.dtype,
        rngs: nnx.Rngs | ParamKeys,
        *,
        layers: int | None = None,
    ):
        lead, ax = ((), ()) if layers is None else ((layers,), (LAYERS,))
        std = 1.0 / math.sqrt(d)  # unit-variance bottleneck activations for unit-scale h
        down = std * jax.random.normal(rngs.params(), (*lead, d, m), jnp.float32)
        self.down = AdapterParam(down.astype(dtype), out_sharding=(*ax, "embed", None))
        self.down_bias = AdapterParam(jnp.zeros((*lead, m), dtype), out_sharding=(*ax, None))
        self.up = AdapterParam(jnp.zeros((*lead, m, d), dtype), out_sharding=(*ax, None, "embed"))
        self.up_bias = AdapterParam(jnp.zeros((*lead, d), dtype), out_sharding=(*ax, "embed"))

    def __call__(self, h_BLD: jax.Array) -> jax.Array:
        z_BLM = dense(h_BLD, self.down[...].astype(h_BLD.dtype)) + self.down_bias[...]
        z_BLM = jax.nn.gelu(z_BLM.astype(h_BLD.dtype), approximate=True)
        out_BLD = dense(z_BLM, self.up[...].astype(h_BLD.dtype)) + self.up_bias[...]
        return h_BLD + out_BLD.astype(h_BLD.dtype)


def apply_adapters(
    backbones: list[tuple[str, nnx.Module]], cfg: PeftConfig, rngs: nnx.Rngs | ParamKeys
) -> list[str]:
    """Puts an adapter after each attention and MLP sublayer of every block, in place;
    returns their module paths."""
    paths = []
    for prefix, model in backbones:
        c = model.cfg
        stacked = c.scan_layers
        blocks = [("blocks", model.blocks)] if stacked else [
            (f"blocks.{i}", b) for i, b in enumerate(model.blocks)
        ]  # fmt: skip
        for name, block in blocks:
            for sub in SUBLAYERS:
                if getattr(block, sub) is not None:
                    raise ValueError(f"peft: {prefix}{name}.{sub} exists already")
                layers = c.n_layers if stacked else None
                adapter = Bottleneck(
                    c.d_model, cfg.adapter_dim, jnp.dtype(c.param_dtype), rngs, layers=layers
                )
                setattr(block, sub, adapter)
                paths.append(f"{prefix}{name}.{sub}")
    return paths


def strip_adapters(model: nnx.Module) -> int:
    """Removes every adapter, in place (the base model again); returns how many."""
    removed = 0
    for _, module in list(nnx.iter_modules(model)):
        for sub in SUBLAYERS:
            if getattr(module, sub, None) is not None:
                setattr(module, sub, None)
                removed += 1
    return removed


def adapter_count(n_layers: int, d: int, m: int) -> int:
    """Houlsby's count: two adapters per layer, each 2·d·m + d + m (weights and biases)."""
    return n_layers * 2 * (2 * d * m + d + m)
