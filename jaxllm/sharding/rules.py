"""Logical axis names → mesh axes, one table per strategy, and activation constraints.

Weights carry logical names (`("embed", "mlp")`); activations use `act_*` names so that the
batch can use the `fsdp` axis while weights are sharded over it too. A name missing from a
table is replicated. `constrain` is a no-op unless `use_rules` is active, so models run
unchanged without a mesh (tests, CPU demos).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

_BATCH = ("data", "fsdp")

RULES: dict[str, dict[str, str | tuple[str, ...] | None]] = {
    # pure data parallel: every weight replicated, the batch split over all devices
    "dp": {"act_batch": _BATCH},
    # ZeRO-3 style: weights and optimizer state split over `fsdp` along their embed axis
    "fsdp": {"act_batch": _BATCH, "embed": "fsdp"},
    # FSDP + Megatron tensor parallel: heads, MLP hidden and vocab split over `tensor`
    "fsdp_tp": {
        "act_batch": _BATCH,
        "embed": "fsdp",
        "heads": "tensor",
        "kv_heads": "tensor",
        "mlp": "tensor",
        "vocab": "tensor",
        "act_heads": "tensor",
        "act_mlp": "tensor",
        "act_vocab": "tensor",
    },
}

_ACTIVE: contextvars.ContextVar[tuple[Mesh, dict] | None] = contextvars.ContextVar(
    "jaxllm_rules", default=None
)


def logical_spec(names: Sequence[str | None] | None, rules: dict) -> PartitionSpec:
    """The PartitionSpec for a tuple of logical names under `rules`."""
    if names is None:
        return PartitionSpec()
    return PartitionSpec(*(rules.get(n) if n else None for n in names))


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: str | dict) -> Iterator[None]:
    """Activates `rules` (a table or its name) so `constrain` places activations on `mesh`."""
    table = RULES[rules] if isinstance(rules, str) else rules
    token = _ACTIVE.set((mesh, table))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_rules() -> tuple[Mesh, dict] | None:
    """(mesh, rule table) while `use_rules` is active, else None (kernels that must run
    under `shard_map` read the mesh and the activation axes from here)."""
    return _ACTIVE.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names under the active rules; else unchanged."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, table = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_spec(names, table)))
