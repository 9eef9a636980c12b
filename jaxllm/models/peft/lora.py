"""LoRA adapters as a variable type (`nnx.LoRAParam`) on the models' dense weights.

`apply_lora(model, cfg, rngs)` attaches, to every weight whose module path matches one of
`cfg.targets`, two parameters next to it: `<name>_lora_a` [*in, rank] (random) and
`<name>_lora_b` [rank, *out] (zeros, so the adapted model starts equal to the base). The
layers' `project` adds `scale * x A B`. Training splits the state by `nnx.LoRAParam`, so only
adapters reach the optimizer; `merge_lora` folds `scale * A B` into the weights and removes
the adapters, giving a plain model whose outputs equal the adapted one's.

Adapters carry the logical axes of the weight they adapt (in-axes on A, out-axes on B), so
they shard with it. On a scanned model (`model.scan_layers`) a weight has a leading `layers`
axis and so do its adapters (`[layers, *in, rank]`, `[layers, rank, *out]`): each scan step
sees one layer's slices. Paths then have no layer index (`blocks.attn.q`), so a target
pattern cannot pick single layers there.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import PeftConfig
from jaxllm.models.layers import LORA_A, LORA_B, QUANT_SCALE, ParamKeys
from jaxllm.models.peft.tokens import merge_tokens
from jaxllm.models.scan import is_stacked

# weight attribute → number of leading input axes (the rest are output axes)
TARGETABLE = {"q": 1, "k": 1, "v": 1, "o": 2, "up": 1, "gate": 1, "down": 1, "head": 1}


def lora_targets(
    model: nnx.Module, patterns: tuple[str, ...]
) -> Iterator[tuple[str, nnx.Module, str]]:
    """(dotted path, owning module, attribute) of each dense weight a pattern matches."""
    compiled = [re.compile(p) for p in patterns]
    for path, module in nnx.iter_modules(model):
        prefix = ".".join(str(p) for p in path)
        for name in TARGETABLE:
            if not isinstance(getattr(module, name, None), nnx.Param):
                continue
            full = f"{prefix}.{name}" if prefix else name
            if any(c.search(full) for c in compiled):
                yield full, module, name


def apply_lora(model: nnx.Module, cfg: PeftConfig, rngs: nnx.Rngs | ParamKeys) -> list[str]:
    """Attaches adapters in place; returns the adapted weights' paths (errors if none)."""
    matched = []
    for full, module, name in list(lora_targets(model, cfg.targets)):
        if getattr(module, name + LORA_A, None) is not None:
            raise ValueError(f"peft: {full} already has a LoRA adapter")
        a, b = _adapters(getattr(module, name), TARGETABLE[name], cfg.rank, rngs)
        setattr(module, name + LORA_A, a)
        setattr(module, name + LORA_B, b)
        module.lora_scale = cfg.scale
        module.lora_dropout = cfg.dropout
        matched.append(full)
    if not matched:
        raise ValueError(
            f"config key 'peft.targets': {list(cfg.targets)} match no dense weight; module "
            f"paths look like 'blocks.0.attn.q', 'blocks.0.mlp.up' (with model.scan_layers: "
            f"'blocks.attn.q', no layer index; targetable: {sorted(TARGETABLE)})"
        )
    return matched


def _adapters(
    w: nnx.Param, n_in: int, rank: int, rngs: nnx.Rngs | ParamKeys
) -> tuple[nnx.LoRAParam, nnx.LoRAParam]:
    """A [*lead, *in, rank] and B [*lead, rank, *out] for weight `w` [*lead, *in, *out]
    (`lead`: the `layers` axis of a scanned model, else nothing)."""
    axes = _axes(w) or (None,) * w.ndim
    k = 1 if is_stacked(w) else 0
    lead, in_shape, out_shape = w.shape[:k], w.shape[k : k + n_in], w.shape[k + n_in :]
    lead_ax, in_ax, out_ax = axes[:k], axes[k : k + n_in], axes[k + n_in :]
    # A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)): Kaiming-uniform(a=sqrt(5)) as in the LoRA
    # reference implementation; B = 0.
    bound = 1.0 / math.sqrt(math.prod(in_shape))
    # a quantised weight (QLoRA's int base) gets float32 adapters
    dtype = w.dtype if jnp.issubdtype(w.dtype, jnp.floating) else jnp.float32
    a = jax.random.uniform(rngs.params(), (*lead, *in_shape, rank), dtype, -bound, bound)
    b = jnp.zeros((*lead, rank, *out_shape), dtype)
    return (
        nnx.LoRAParam(a, out_sharding=(*lead_ax, *in_ax, None)),
        nnx.LoRAParam(b, out_sharding=(*lead_ax, None, *out_ax)),
    )


def merge_lora(model: nnx.Module) -> int:
    """Folds every adapter into its weight (`W += scale * A B`, in float32) and removes the
    adapters, in place, trainable tokens' deltas too (`merge_tokens`). Returns how many
    weights were merged. A 16-bit weight becomes float32 (bf16 would round away most of a
    small update); a quantised weight (QLoRA's int base) cannot take the float update:
    ValueError."""
    merged = 0
    for path, module in list(nnx.iter_modules(model)):
        for name in TARGETABLE:
            a = getattr(module, name + LORA_A, None)
            if a is None:
                continue
            if getattr(module, name + QUANT_SCALE, None) is not None:
                where = ".".join(str(p) for p in (*path, name))
                raise ValueError(
                    f"peft: the LoRA adapter of {where} sits on a quantised weight (QLoRA), "
                    "which cannot hold the merged float update; keep the adapters, or "
                    "dequantise first"
                )
            b = getattr(module, name + LORA_B)
            w = getattr(module, name)
            lead = w.shape[:1] if is_stacked(w) else ()
            rank = a.shape[-1]
            a2 = a[...].astype(jnp.float32).reshape(*lead, -1, rank)
            b2 = b[...].astype(jnp.float32).reshape(*lead, rank, -1)
            delta = (a2 @ b2).reshape(w.shape)  # per layer when stacked
            dtype = jnp.promote_types(w.dtype, jnp.float32)
            w.set_value((w[...].astype(jnp.float32) + module.lora_scale * delta).astype(dtype))
            delattr(module, name + LORA_A)
            delattr(module, name + LORA_B)
            merged += 1
    return merged + merge_tokens(model)


def has_lora(state: nnx.State) -> bool:
    return any(True for _ in jax.tree.leaves(nnx.filter_state(state, nnx.LoRAParam)))


def _axes(w: nnx.Param) -> tuple | None:
    meta = w.get_metadata() if hasattr(w, "get_metadata") else {}
    axes = meta.get("out_sharding")
    return tuple(axes) if axes else None
