"""The jitted train and eval steps, built once per stage from a `loss_fn`.

A stage's `loss_fn(model, batch, key) -> (loss_sum, aux)` returns *sums*; `aux["weight"]` is
what they sum over (tokens, pairs, sequences). The step adds micro-batches (gradient
accumulation with `lax.scan`, so one compiled program per optimizer step) and divides by the
total weight once, so accumulation is exactly a larger batch. Metrics are `aux / weight`.

Stages that need fixed arrays besides the model (a DPO/PPO reference model, a distillation
teacher) pass `const_shardings`: the step then takes a third argument `consts` (a pytree,
never donated, never differentiated, not checkpointed) and calls
`loss_fn(model, batch, key, consts)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxllm.sharding import use_rules
from jaxllm.training.state import TrainState, batch_sharding

LossFn = Callable[[nnx.Module, dict[str, jax.Array], jax.Array], tuple[jax.Array, dict]]


def _call(loss_fn, model, batch, key, consts):
    return loss_fn(model, batch, key) if consts is None else loss_fn(model, batch, key, consts)


def _grads(graphdef, loss_fn: LossFn, state: TrainState, batch: dict, key, consts=None):
    def f(params):
        model = nnx.merge(graphdef, params, state.frozen)
        loss, aux = _call(loss_fn, model, batch, key, jax.lax.stop_gradient(consts))
        return loss, {**aux, "loss": loss}

    (_, aux), grads = jax.value_and_grad(f, has_aux=True)(state.params)
    return grads, aux


def _accumulate(graphdef, loss_fn: LossFn, state: TrainState, batch: dict, key, consts=None):
    """Sums gradients and aux over the leading micro-batch axis with `lax.scan`."""
    first = jax.tree.map(lambda x: x[0], batch)
    zeros = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype),
        jax.eval_shape(lambda: _grads(graphdef, loss_fn, state, first, key, consts)),
    )

    def body(carry, xs):
        micro, i = xs
        out = _grads(graphdef, loss_fn, state, micro, jax.random.fold_in(key, i), consts)
        return jax.tree.map(jnp.add, carry, out), None

    n = jax.tree.leaves(batch)[0].shape[0]
    (grads, aux), _ = jax.lax.scan(body, zeros, (batch, jnp.arange(n)))
    return grads, aux


def make_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    shardings: Any,
    mesh: Mesh,
    rules: str,
    grad_accum: int = 1,
    const_shardings: Any = None,
) -> Callable[..., tuple[TrainState, dict]]:
    """`step(state, batch[, consts]) -> (state, metrics)`, jitted with shardings; `state` is
    donated. `consts` is an argument only when `const_shardings` is given."""

    def step(state: TrainState, batch: dict, consts: Any = None) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        with use_rules(mesh, rules):
            if grad_accum > 1:
                grads, aux = _accumulate(graphdef, loss_fn, state, batch, key, consts)
            else:
                grads, aux = _grads(graphdef, loss_fn, state, batch, key, consts)
        # Divide by the true total (pair weights are fractions: 1/3 per pair of a ranking of
        # three); only an empty batch (total 0, so all sums are 0) divides by 1 instead.
        weight = jnp.where(aux["weight"] > 0, aux["weight"], 1.0)
        grads = jax.tree.map(lambda g: (g / weight).astype(g.dtype), grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {k: v / weight for k, v in aux.items() if k != "weight"}
        metrics.update(
            weight=aux["weight"], grad_norm=optax.tree.norm(grads), lr=schedule(state.step)
        )
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new, metrics

    data = batch_sharding(mesh, 1, leading=1 if grad_accum > 1 else 0)
    ins = (shardings, data) if const_shardings is None else (shardings, data, const_shardings)
    return jax.jit(step, in_shardings=ins, out_shardings=(shardings, None), donate_argnums=(0,))


def make_eval_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    shardings: Any,
    mesh: Mesh,
    rules: str,
    const_shardings: Any = None,
) -> Callable[..., dict]:
    """`eval(state, batch[, consts]) -> aux sums` (no dropout); callers add them up and divide."""

    def step(state: TrainState, batch: dict, consts: Any = None) -> dict:
        with use_rules(mesh, rules):
            model = nnx.merge(graphdef, state.params, state.frozen)
            loss, aux = _call(loss_fn, model, batch, None, consts)
        return {**aux, "loss": loss}

    data = batch_sharding(mesh, 1)
    ins = (shardings, data) if const_shardings is None else (shardings, data, const_shardings)
    return jax.jit(step, in_shardings=ins)
