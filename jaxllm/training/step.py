"""The jitted train and eval steps, built once per stage from a `loss_fn`.

A stage's `loss_fn(model, batch, key) -> (loss_sum, aux)` returns *sums*; `aux["weight"]` is
what they sum over (tokens, pairs, sequences). The step adds micro-batches (gradient
accumulation with `lax.scan`, so one compiled program per optimizer step) and divides by the
total weight once, so accumulation is exactly a larger batch. Metrics are `aux / weight`.
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


def _grads(graphdef, loss_fn: LossFn, state: TrainState, batch: dict, key: jax.Array):
    def f(params):
        model = nnx.merge(graphdef, params, state.frozen)
        loss, aux = loss_fn(model, batch, key)
        return loss, {**aux, "loss": loss}

    (_, aux), grads = jax.value_and_grad(f, has_aux=True)(state.params)
    return grads, aux


def _accumulate(graphdef, loss_fn: LossFn, state: TrainState, batch: dict, key: jax.Array):
    """Sums gradients and aux over the leading micro-batch axis with `lax.scan`."""
    first = jax.tree.map(lambda x: x[0], batch)
    zeros = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype),
        jax.eval_shape(lambda: _grads(graphdef, loss_fn, state, first, key)),
    )

    def body(carry, xs):
        micro, i = xs
        out = _grads(graphdef, loss_fn, state, micro, jax.random.fold_in(key, i))
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
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`step(state, batch) -> (state, metrics)`, jitted with shardings; `state` is donated."""

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        with use_rules(mesh, rules):
            if grad_accum > 1:
                grads, aux = _accumulate(graphdef, loss_fn, state, batch, key)
            else:
                grads, aux = _grads(graphdef, loss_fn, state, batch, key)
        weight = jnp.maximum(aux["weight"], 1.0)
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
    return jax.jit(
        step, in_shardings=(shardings, data), out_shardings=(shardings, None), donate_argnums=(0,)
    )


def make_eval_step(
    graphdef: nnx.GraphDef, loss_fn: LossFn, shardings: Any, mesh: Mesh, rules: str
) -> Callable[[TrainState, dict], dict]:
    """`eval(state, batch) -> aux sums` (no dropout); callers add them up and divide."""

    def step(state: TrainState, batch: dict) -> dict:
        with use_rules(mesh, rules):
            model = nnx.merge(graphdef, state.params, state.frozen)
            loss, aux = loss_fn(model, batch, None)
        return {**aux, "loss": loss}

    return jax.jit(step, in_shardings=(shardings, batch_sharding(mesh, 1)))
