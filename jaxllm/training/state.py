"""The train state pytree and its abstract-first, sharded initialisation.

`TrainState` holds the trainable variables (`params`), everything else of the model (`frozen`:
base weights under LoRA, buffers), the optimizer state, the step and the RNG key. The model's
`graphdef` stays outside: compiled code only ever sees this pytree.

Precision rule: trained weights are float32 master weights, so Adam's moments are float32
too, whatever the compute dtype (every layer casts its weights to `model.dtype` at use). A
model built from the config must say so (`check_training_precision`); weights that arrive in
bfloat16 (a bf16 HF import being fine-tuned) are upcast when the state is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm.config import ModelConfig
from jaxllm.errors import ConfigError
from jaxllm.sharding import logical_spec
from jaxllm.sharding.rules import RULES


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: nnx.State  # trainable variables
    frozen: nnx.State  # the rest of the model's variables (not differentiated)
    opt_state: optax.OptState
    rng: jax.Array  # uint32 raw key data; per-step keys are fold_in(rng, step)


def check_training_precision(m: ModelConfig) -> None:
    """Refuses the dtypes a trained model must not have: bfloat16 master weights (updates
    smaller than bf16's resolution round away, in the weights and in Adam's moments) and
    float16 compute (its gradients underflow without loss scaling, which jaxllm lacks)."""
    if m.param_dtype != "float32":
        raise ConfigError(
            f"config key 'model.param_dtype': {m.param_dtype} would keep the trained weights "
            "and Adam's moments in 16 bits, where small updates round away; train with "
            "dtype: bfloat16, param_dtype: float32 (float32 master weights, bf16 compute)"
        )
    if m.dtype == "float16":
        raise ConfigError(
            "config key 'model.dtype': float16 training needs loss scaling, which jaxllm does "
            "not implement (small gradients underflow to zero); use dtype: bfloat16 (float32's "
            "range) with param_dtype: float32"
        )


def master_weights(params: nnx.State) -> nnx.State:
    """`params` with every floating leaf in float32: the weights the optimizer updates."""

    def up(x: jax.Array) -> jax.Array:
        return x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(up, params)


def state_shardings(abstract: Any, mesh: Mesh, rules: str) -> Any:
    """NamedShardings for every leaf from the logical axes the variables carry, in the
    abstract state's own structure: a variable that holds `optax.MaskedNode` (the empty slot
    `optax.partition` leaves in one group's state for another group's parameter, as Muon's
    does) has no array, so it gets no sharding."""
    table = RULES[rules]
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731

    def place(leaf: Any, spec: Any) -> Any:
        if is_var(leaf) and isinstance(leaf.get_value(), optax.MaskedNode):
            return leaf
        return jax.tree.map(
            lambda p: NamedSharding(mesh, logical_spec(tuple(p), table)),
            spec,
            is_leaf=lambda x: isinstance(x, PartitionSpec),
        )

    return jax.tree.map(place, abstract, nnx.get_partition_spec(abstract), is_leaf=is_var)


def train_state_init(
    model_fn: Callable[[], nnx.Module],
    tx: optax.GradientTransformation,
    seed: int,
    trainable: Any = nnx.Param,
) -> tuple[nnx.GraphDef, Callable[[], TrainState]]:
    """`(graphdef, init)`: the model's graphdef (built abstractly) and a function making the
    fresh train state; `jax.eval_shape(init)` is the state's shapes, with no weight
    allocated (what config checks and `create_train_state` start from)."""

    def init() -> TrainState:
        _, params, frozen = nnx.split(model_fn(), trainable, ...)
        params = master_weights(params)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            frozen=frozen,
            opt_state=tx.init(params),
            rng=jax.random.key_data(jax.random.key(seed)),
        )

    return nnx.split(nnx.eval_shape(model_fn), trainable, ...)[0], init


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """A train state before it exists: its graphdef, shapes, shardings and initialiser."""

    graphdef: nnx.GraphDef
    abstract: TrainState  # jax.ShapeDtypeStruct leaves
    shardings: Any
    init: Callable[[], TrainState]


def train_state_spec(
    model_fn: Callable[[], nnx.Module],
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: str,
    seed: int,
    trainable: Any = nnx.Param,
) -> StateSpec:
    """The abstract state (`jax.eval_shape`: nothing allocated) and its shardings; what
    `create_train_state` materialises and `--plan` measures."""
    graphdef, init = train_state_init(model_fn, tx, seed, trainable)
    abstract = jax.eval_shape(init)
    return StateSpec(graphdef, abstract, state_shardings(abstract, mesh, rules), init)


def create_train_state(
    model_fn: Callable[[], nnx.Module],
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: str,
    seed: int,
    trainable: Any = nnx.Param,
) -> tuple[nnx.GraphDef, TrainState, Any]:
    """Builds the state directly in its shardings: eval_shape → shardings → jit(init).

    Nothing is materialised on one device first, so a model larger than one device fits.
    Returns `(graphdef, state, shardings)`; the shardings are the jit in/out shardings and the
    checkpoint restore target.
    """
    spec = train_state_spec(model_fn, tx, mesh, rules, seed, trainable)
    state = jax.jit(spec.init, out_shardings=spec.shardings)()
    return spec.graphdef, state, spec.shardings


def batch_sharding(mesh: Mesh, ndim: int, leading: int = 0) -> NamedSharding:
    """Batch arrays split over (data, fsdp) on their batch axis (after `leading` axes)."""
    spec = [None] * leading + [("data", "fsdp")] + [None] * (ndim - leading - 1)
    return NamedSharding(mesh, PartitionSpec(*spec))


def to_global(batch: dict[str, Any], mesh: Mesh, leading: int = 0) -> dict[str, jax.Array]:
    """This process's rows → global arrays sharded over (data, fsdp), on every host."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim, leading), v)
        for k, v in batch.items()
    }


def count_params(state: nnx.State) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(state))
