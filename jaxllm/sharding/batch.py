"""Batch rows on the mesh, for code that must run the same on one process or many.

A global batch is split over the `act_batch` mesh axes of a rule table; each process holds
the rows its devices hold (`process_rows`), builds its part on the host and joins it into a
global array (`rows_to_global`). Host values come back as this process's rows
(`local_rows`) or, where every process needs all of them, gathered (`to_host`, a
collective). `map_rows` runs a jitted function over a host batch that every process knows
in full (held-out prompts, texts to score), padded to the mesh and split among processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm.sharding.rules import RULES


def batch_axes(rules: str | dict) -> tuple[str, ...]:
    """The mesh axes the batch is split over under `rules` (its `act_batch` entry)."""
    table = RULES[rules] if isinstance(rules, str) else rules
    axes = table.get("act_batch") or ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def row_sharding(mesh: Mesh, rules: str | dict = "dp") -> NamedSharding:
    """Arrays of any rank split over the batch axes along their first axis."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(rules) or None))


def batch_shards(mesh: Mesh, rules: str | dict = "dp") -> int:
    """How many pieces the batch is split into (the product of its mesh axes)."""
    return math.prod(mesh.shape[a] for a in batch_axes(rules))


def process_rows(mesh: Mesh, rules: str | dict, n: int) -> slice:
    """The rows of an `n`-row global batch that this process's devices hold (one
    contiguous block; all of them in a single process)."""
    index = row_sharding(mesh, rules).addressable_devices_indices_map((n,))
    spans = {(s[0].start or 0, n if s[0].stop is None else s[0].stop) for s in index.values()}
    start, stop = min(a for a, _ in spans), max(b for _, b in spans)
    if sum(b - a for a, b in spans) != stop - start:
        raise ValueError(
            f"this process's devices hold rows {sorted(spans)} of the batch: not one block "
            "(order the mesh's devices by process)"
        )
    return slice(start, stop)


def rows_multiple(mesh: Mesh, rules: str | dict = "dp") -> int:
    """Rows per process must be a multiple of this for the global batch to split evenly."""
    rows = process_rows(mesh, rules, batch_shards(mesh, rules))
    return rows.stop - rows.start


def rows_to_global(tree: Any, mesh: Mesh, rules: str | dict = "dp") -> Any:
    """This process's rows (host arrays) → global arrays split over the batch axes."""
    sharding = row_sharding(mesh, rules)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree
    )


def replicated(tree: Any, mesh: Mesh) -> Any:
    """Host values that every process holds alike → arrays replicated on the mesh."""
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree
    )


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of an array split along its first axis only, from its own
    shards (no communication; replicas of a row are read once)."""
    shards = {s.index[0].start or 0: s for s in x.addressable_shards} if x.ndim else {}
    if not shards:
        return np.asarray(x.addressable_data(0))
    return np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)])


def to_host(tree: Any) -> Any:
    """Every row of global arrays as numpy on every process (a collective: all processes
    call it). In one process a plain device-to-host copy."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def process_max(value: int) -> int:
    """The largest of an integer over all processes (a collective)."""
    if jax.process_count() == 1:
        return int(value)
    return int(np.max(multihost_utils.process_allgather(np.int64(value))))


def pad_rows(tree: Any, multiple: int) -> tuple[Any, int]:
    """Host arrays with their last row repeated up to a multiple of `multiple` rows (so
    every batch of a loop keeps one shape); returns (padded, real row count)."""
    n = len(jax.tree.leaves(tree)[0])
    extra = -n % multiple
    return jax.tree.map(lambda x: np.concatenate([x, np.repeat(x[-1:], extra, 0)]), tree), n


def map_rows(fn: Callable[[Any], Any], batch: Any, mesh: Mesh, rules: str | dict = "dp") -> Any:
    """`fn(global batch) -> arrays [B, ...]` on a host batch every process holds in full:
    padded to the mesh, each process uploads its rows, and every process gets all output
    rows back (padding dropped)."""
    padded, n = pad_rows(batch, batch_shards(mesh, rules))
    mine = process_rows(mesh, rules, len(jax.tree.leaves(padded)[0]))
    out = to_host(fn(rows_to_global(jax.tree.map(lambda x: x[mine], padded), mesh, rules)))
    return jax.tree.map(lambda x: np.asarray(x)[:n], out)
