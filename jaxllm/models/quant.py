"""Weight-only quantisation of the models' dense weights, looked up by name in one table
(`QUANT_METHODS`): int8 with one scale per output channel, int4 with one scale per output
channel and group of `group_size` input features.

The numerics are qwix's (Google's JAX quantisation library): `qwix.quantize` with symmetric
absmax calibration (scale = absmax / (qmax + 0.5), values rounded to nearest and saturated,
so |w - dequantised w| <= scale / 2 in every group) and `qwix.dequantize`. qwix's model
surgery (`qwix.quantize_model`) is not used: it finds weights by intercepting
`dot_general` calls whose operand *is* a module parameter, and jaxllm's `dense` reshapes and
casts the weight first (and runs its own custom VJP on CPU), so nothing would be found; and
it swaps parameters at call time, where jaxllm needs the quantised weights in the explicit
state pytree that orbax saves and jit shards.

`quantize_model(model, cfg)` replaces, in place, every weight whose module path matches a
`scope` pattern by a `QuantWeight` (int8 / int4 values, same shape and logical axes, so it
shards like the float weight) and puts its `QuantScale` (float32) beside it as
`<name>_qscale`; `layers.project` dequantises at use, so activations stay in the compute
dtype and LoRA adapters (QLoRA) apply on top unchanged. Both types subclass `nnx.Param`
(checkpoints and shardings treat them as weights) but never train: a stage trains only a
PEFT method's variables on a quantised base.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from jaxllm.config.quant import QuantizeConfig
from jaxllm.models.layers import QUANT_SCALE
from jaxllm.models.peft.lora import TARGETABLE
from jaxllm.models.scan import is_stacked


class QuantWeight(nnx.Param):
    """The integer values of a quantised weight (frozen)."""


class QuantScale(nnx.Param):
    """The float32 scales of a quantised weight (frozen)."""


@dataclass(frozen=True)
class QuantMethod:
    """One weight-only method: its integer type and whether scales are per group of
    input features (else one per output channel over the whole input)."""

    name: str
    qtype: jnp.dtype
    grouped: bool

    @property
    def qmax(self) -> int:
        return int(jnp.iinfo(self.qtype).max)


QUANT_METHODS: dict[str, QuantMethod] = {
    "int8": QuantMethod("int8", jnp.dtype(jnp.int8), grouped=False),
    "int4": QuantMethod("int4", jnp.dtype(jnp.int4), grouped=True),
}


def quant_method(name: str) -> QuantMethod:
    if name not in QUANT_METHODS:
        raise ValueError(f"quantize.method: {name!r} is not one of {['none', *QUANT_METHODS]}")
    return QUANT_METHODS[name]


def quant_targets(model: nnx.Module, scope: tuple[str, ...]):
    """(dotted path, owning module, attribute) of each float dense weight `scope` matches."""
    compiled = [re.compile(p) for p in scope]
    for path, module in nnx.iter_modules(model):
        prefix = ".".join(str(p) for p in path)
        for name in TARGETABLE:
            w = getattr(module, name, None)
            if not isinstance(w, nnx.Param) or isinstance(w, QuantWeight):
                continue
            full = f"{prefix}.{name}" if prefix else name
            if any(c.search(full) for c in compiled):
                yield full, module, name


def scale_layout(
    shape: tuple[int, ...], n_in: int, stacked: bool, method: QuantMethod, group_size: int,
    path: str = "",
) -> tuple[tuple[int, ...], dict[int, int]]:  # fmt: skip
    """qwix's `(channelwise_axes, tiled_axes)` for a weight [*lead, *in, *out]: output (and
    layer) axes channelwise; int8 reduces over all input axes, int4 tiles the last input
    axis in groups of `group_size` (the whole axis when it is shorter) and keeps any
    earlier input axis (e.g. the heads of `attn.o`) channelwise."""
    k = 1 if stacked else 0
    out_axes = tuple(range(k + n_in, len(shape)))
    lead = tuple(range(k))
    if not method.grouped:
        return lead + out_axes, {}
    last_in = k + n_in - 1
    group = min(group_size, shape[last_in])
    if shape[last_in] % group:
        raise ValueError(
            f"config key 'quantize.group_size': {group_size} does not divide the input axis "
            f"({shape[last_in]}) of {path or 'a weight'}; pick a divisor"
        )
    return lead + tuple(range(k, last_in)) + out_axes, {last_in: group}


def quantize_array(w: jax.Array, n_in: int, stacked: bool, method: QuantMethod, group: int,
                   path: str = "") -> qwix.QArray:  # fmt: skip
    """`w` as a qwix QArray (symmetric absmax, float32 scales)."""
    channelwise, tiled = scale_layout(w.shape, n_in, stacked, method, group, path)
    return qwix.quantize(
        w.astype(jnp.float32), method.qtype, channelwise_axes=channelwise, tiled_axes=tiled
    )


def dequantize(values: jax.Array, scale: jax.Array) -> jax.Array:
    """scale * values (scales broadcast over their groups), in float32."""
    return qwix.dequantize(qwix.QArray(values, scale.astype(jnp.float32)))


def quantize_model(model: nnx.Module, cfg: QuantizeConfig) -> list[str]:
    """Quantises, in place, every dense weight `cfg.scope` matches (call under
    `nnx.use_eager_sharding(False)` or a mesh); returns their paths. Errors (ValueError,
    naming the config key) when nothing matches."""
    method = quant_method(cfg.method)
    done = []
    for full, module, name in list(quant_targets(model, cfg.scope)):
        w = getattr(module, name)
        stacked = is_stacked(w)
        q = quantize_array(w[...], TARGETABLE[name], stacked, method, cfg.group_size, full)
        axes = _axes(w) or (None,) * w.ndim
        scale_axes = tuple(a if s == d else None for a, s, d in zip(axes, q.scale.shape, w.shape))
        setattr(module, name, QuantWeight(q.qvalue, out_sharding=axes))
        setattr(module, name + QUANT_SCALE, QuantScale(q.scale, out_sharding=scale_axes))
        done.append(full)
    if not done:
        raise ValueError(
            f"config key 'quantize.scope': {list(cfg.scope)} match no float dense weight; "
            f"module paths look like 'blocks.0.attn.q', 'blocks.0.mlp.up', 'head' "
            f"(targetable: {sorted(TARGETABLE)})"
        )
    return done


def dequantize_model(model: nnx.Module, dtype: str | jnp.dtype = jnp.float32) -> int:
    """Replaces every quantised weight by plain `dtype` weights (scale * int), in place;
    returns how many (what `export` with `hf.dequantize` writes)."""
    count = 0
    for _, module in list(nnx.iter_modules(model)):
        for name in TARGETABLE:
            scale = getattr(module, name + QUANT_SCALE, None)
            if scale is None:
                continue
            w = getattr(module, name)
            value = dequantize(w[...], scale[...]).astype(dtype)
            setattr(module, name, nnx.Param(value, out_sharding=_axes(w)))
            delattr(module, name + QUANT_SCALE)
            count += 1
    return count


def is_quantized(tree: nnx.Module | nnx.State) -> bool:
    """Whether a model or state holds quantised weights."""
    state = tree if isinstance(tree, nnx.State) else nnx.state(tree)
    return bool(jax.tree.leaves(nnx.filter_state(state, QuantWeight)))


def quant_bytes(state: nnx.State) -> dict[str, int]:
    """Bytes of a model's variables as held in memory: quantised values (int4 takes one byte
    per value in a jax array on CPU, as in numpy), their scales, and the rest."""

    def size(filt) -> int:
        leaves = jax.tree.leaves(nnx.filter_state(state, filt))
        return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves)

    values, scales = size(QuantWeight), size(QuantScale)
    total = size(...)
    return {"quantized_values": values, "scales": scales, "other": total - values - scales,
            "total": total}  # fmt: skip


def _axes(w: nnx.Variable) -> tuple | None:
    meta = w.get_metadata() if hasattr(w, "get_metadata") else {}
    axes = meta.get("out_sharding")
    return tuple(axes) if axes else None


__all__ = [
    "QUANT_METHODS",
    "QuantMethod",
    "QuantScale",
    "QuantWeight",
    "dequantize",
    "dequantize_model",
    "is_quantized",
    "quant_bytes",
    "quant_method",
    "quantize_array",
    "quantize_model",
    "scale_layout",
]
