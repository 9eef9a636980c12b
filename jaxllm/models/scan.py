"""Scan over layers (`model.scan_layers`): the blocks' variables stacked on a leading `layers`
axis and run with `jax.lax.scan`, so the compiled program holds one block, not n_layers.

The stacked blocks are one `Block` module whose every variable has the extra axis (logical
name `layers`, never sharded). Running them is functional: `nnx.split` once, then each scan
iteration `nnx.merge`s that layer's slice of the state (no NNX transforms in core code).
Numerics equal the unrolled model's: the same per-layer dropout keys (`fold_in(key, i)`),
the same rematerialisation (`jax.checkpoint` with the `model.remat` policy around each
layer, inside the scan body).

The KV cache of a scanned model holds [n_layers, B, K, S, H] arrays (one per k and v), scanned
over with the blocks; each `extend` writes the cache once more as the scan's output (a copy
of the cache per call, the same order of memory traffic as attention reading it).

`stack_layers` / `unstack_layers` convert a model state between the two layouts (tests,
conversions); the state trees differ, so a checkpoint loads only into the layout it was
saved from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

LAYERS = "layers"  # the logical name of the stacked axis (absent from every rule table)
REMAT_POLICY = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims}


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _axes(var: nnx.Variable) -> tuple | None:
    axes = var.get_metadata().get("out_sharding")
    return tuple(axes) if axes else None


def is_stacked(var: nnx.Variable) -> bool:
    """Whether a variable carries the leading `layers` axis."""
    axes = _axes(var)
    return bool(axes) and axes[0] == LAYERS


def _stack(vs: Sequence[nnx.Variable]) -> nnx.Variable:
    axes = _axes(vs[0])
    value = jnp.stack([v.get_value() for v in vs])
    return vs[0].replace(value=value, out_sharding=(LAYERS, *axes) if axes else None)


def _take(v: nnx.Variable, i: int) -> nnx.Variable:
    axes = _axes(v)
    return v.replace(value=v.get_value()[i], out_sharding=axes[1:] if axes else None)


def stack_states(states: Sequence[nnx.State]) -> nnx.State:
    """Per-layer states of one structure → one state, each variable stacked on `layers`."""
    flats = [nnx.to_flat_state(s) for s in states]
    paths = [path for path, _ in flats[0]]
    return nnx.from_flat_state([(p, _stack([f[j][1] for f in flats])) for j, p in enumerate(paths)])


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
    """Modules of one structure → one module of that structure with stacked variables."""
    graphdef = nnx.split(modules[0])[0]
    return nnx.merge(graphdef, stack_states([nnx.split(m)[1] for m in modules]))


def stack_layers(state: nnx.State, n_layers: int) -> nnx.State:
    """A Decoder state (or any state holding one under a `blocks` key, e.g. a reward model's
    `decoder.blocks`) in the unrolled layout (`blocks.<i>.…`) → the scanned (`blocks.…`)."""
    groups: dict[tuple, list] = {}
    out = []
    for path, var in nnx.to_flat_state(state):
        at = path.index("blocks") if "blocks" in path else -1
        if at < 0:
            out.append((path, var))
            continue
        groups.setdefault(path[: at + 1] + path[at + 2 :], [None] * n_layers)[path[at + 1]] = var
    out += [(path, _stack(vs)) for path, vs in groups.items()]
    return nnx.from_flat_state(out)


def unstack_layers(state: nnx.State, n_layers: int) -> nnx.State:
    """A state in the scanned layout → the unrolled one (`blocks.<i>.…`)."""
    out = []
    for path, var in nnx.to_flat_state(state):
        if "blocks" not in path:
            out.append((path, var))
            continue
        at = path.index("blocks") + 1
        out += [(path[:at] + (i,) + path[at:], _take(var, i)) for i in range(n_layers)]
    return nnx.from_flat_state(out)


def scan_blocks(
    blocks: nnx.Module,
    x_BLD: jax.Array,
    mask_BLL: jax.Array,
    rope: Any,
    *,
    key: jax.Array | None,
    remat: str,
    segment_ids_BL: jax.Array | None,
    prefix: tuple[jax.Array, jax.Array] | None = None,
    causal: bool = True,
) -> jax.Array:
    """The training/scoring forward through the stacked blocks (causal, no cache);
    `prefix`: prefix-tuning keys and values [n_layers, P, K, H], scanned with the blocks;
    `causal`: the blocks' promise that the mask is causal within the segments (False: it is
    not, and no fused kernel runs)."""
    graphdef, state = nnx.split(blocks)

    def layer(state_i, x_BLD, mask_BLL, rope, key, seg_BL, prefix_i):
        block = nnx.merge(graphdef, state_i)
        return block(
            x_BLD, mask_BLL, rope, key=key, causal=causal, segment_ids_BL=seg_BL, prefix=prefix_i
        )[0]

    if remat != "none":
        layer = jax.checkpoint(layer, policy=REMAT_POLICY[remat], prevent_cse=False)

    def body(x_BLD: jax.Array, xs: tuple) -> tuple[jax.Array, None]:
        state_i, i, prefix_i = xs
        layer_key = None if key is None else jax.random.fold_in(key, i)
        return layer(state_i, x_BLD, mask_BLL, rope, layer_key, segment_ids_BL, prefix_i), None

    n = jax.tree.leaves(state)[0].shape[0]
    return jax.lax.scan(body, x_BLD, (state, jnp.arange(n), prefix))[0]


def scan_extend(
    blocks: nnx.Module,
    x_BLD: jax.Array,
    mask_BLS: jax.Array,
    rope: Any,
    k_NBKSH: jax.Array,
    v_NBKSH: jax.Array,
    index: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The cached forward through the stacked blocks: each layer reads and writes its slice
    of the stacked cache (N = n_layers). Returns (x_BLD, k_NBKSH, v_NBKSH)."""
    graphdef, state = nnx.split(blocks)

    def body(x_BLD: jax.Array, xs: tuple) -> tuple[jax.Array, tuple]:
        state_i, k_BKSH, v_BKSH = xs
        block = nnx.merge(graphdef, state_i)
        x_BLD, kv = block(x_BLD, mask_BLS, rope, kv=(k_BKSH, v_BKSH), index=index)
        return x_BLD, kv

    x_BLD, (k_NBKSH, v_NBKSH) = jax.lax.scan(body, x_BLD, (state, k_NBKSH, v_NBKSH))
    return x_BLD, k_NBKSH, v_NBKSH
