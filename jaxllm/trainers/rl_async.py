"""Asynchronous rollouts with bounded staleness (`grpo.max_staleness` / `ppo.max_staleness`:
k >= 1): one background thread samples and scores the rollouts of the next iterations with
weights up to k updates old while the main thread trains on the current one.

Schedule. Iterations are cut into segments at the resume checkpoints (every
`checkpoint_every` iterations, the last one, and wherever a run resumed). In a segment that
starts after iteration b, the rollouts of iteration i are sampled with the weights after
iteration max(b, i − 1 − k): staleness min(k, i − 1 − b). At a segment's start the producer
gets the rollouts of b + 1 … b + 1 + k (all with the weights after b); after training each
iteration j it gets those of j + 1 + k. So the pipeline is empty at every resume checkpoint:
a resumed run starts the same segment with the same weights and host RNG state as the
uninterrupted one and repeats it exactly, and no old weights need saving. The price is one
iteration per segment whose sampling is not overlapped.

Determinism. The host draws (prompt rows, then the minibatch order: `plan_iteration`) are
made on the main thread when an iteration's rollouts are submitted, in iteration order, so
they are the synchronous run's draws; rollout keys are `fold_in(seed, iteration)`; the
weights each rollout sees are fixed by the schedule, not by timing.

Off-policy correction (the decoupled PPO objective of Fu et al. 2025, "AReaL",
arXiv:2505.24298): π_θ / π_behaviour = (π_θ / π_old) · (π_old / π_behaviour). The clipped
ratio is taken against π_old, the learner's current weights when the iteration starts (the
scoring pass, as in the synchronous loop), and each token's loss is weighted by the truncated
IS weight min(π_old / π_sampler, tis_cap) (`policy_losses.tis_fields`), the sampler's
log-probs being the behaviour policy's; config validation requires `tis_cap` with k >= 1.
The sampler/learner agreement check runs in the producer at the sampling weights
(`rollout.make_gap_pass`) for stale rollouts.

The sampling weights are a device copy of the state's params and frozen part (the train
step donates the state, so the arrays the producer reads must be its own; up to k + 1 copies
live at once). One process only: two threads would dispatch multi-process programs in
different orders on different hosts.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.errors import ConfigError, JaxllmError
from jaxllm.trainers.rollout import check_gap, make_gap_pass

WAIT_TIMEOUT_S = 3600.0  # the longest the learner waits for one iteration's rollouts


class RolloutTimeout(JaxllmError):
    """The producer thread did not deliver an iteration's rollouts in time."""


def segment_end(start: int, every: int, last: int) -> int:
    """The last iteration of the segment that starts after iteration `start`: the next
    resume checkpoint (a multiple of `every`; 0: only the last iteration) or `last`."""
    return min(last, (start // every + 1) * every) if every else last


def staleness(it: int, k: int, every: int) -> int:
    """Updates between the sampling weights and the learner's for iteration `it` of a run
    that did not resume: min(k, it − 1 − the segment's start)."""
    start = (it - 1) // every * every if every else 0
    return min(k, it - 1 - start)


class Producer:
    """One daemon thread running submitted jobs in order; a job's exception is set on its
    future, so `result()` raises it in the caller's thread. Daemon: a job stuck in a compiled
    program never blocks the interpreter's exit."""

    def __init__(self, name: str = "jaxllm-rollouts") -> None:
        self.jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def submit(self, fn: Callable, *args) -> Future:
        fut: Future = Future()
        self.jobs.put((fut, fn, args))
        return fut

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            fut, fn, args = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                fut.set_exception(e)

    def close(self) -> None:
        """Cancels the jobs not started and lets the thread end after the running one."""
        while True:
            try:
                fut, _, _ = self.jobs.get_nowait()
            except queue.Empty:
                break
            fut.cancel()
        self.jobs.put(None)


class RolloutPipeline:
    """The schedule of the module docstring over any `prepare(it, rng)` (host draws, main
    thread), `produce(it, weights, plan, stale)` (the background thread) and
    `snapshot(state)` (the weights the producer may keep)."""

    def __init__(
        self, k: int, every: int, last: int, prepare: Callable, produce: Callable,
        snapshot: Callable,
    ) -> None:  # fmt: skip
        self.k, self.every, self.last = k, every, last
        self.prepare, self.produce, self.snapshot = prepare, produce, snapshot
        self.pending: dict[int, tuple[Any, Future, int]] = {}  # it -> (plan, result, stale)
        self.end = 0  # the current segment's last iteration
        self.producer = Producer()

    def take(self, it: int, state: Any, rng: Any) -> tuple[Any, Any, int]:
        """(plan, produced rollouts, staleness) of iteration `it`; starts a segment first
        when nothing is pending for it (a fresh or resumed run, after a checkpoint)."""
        if it not in self.pending:
            self.end = segment_end(it - 1, self.every, self.last)
            self._submit(range(it, min(it + self.k, self.end) + 1), it - 1, state, rng)
        plan, fut, stale = self.pending.pop(it)
        try:
            return plan, fut.result(timeout=WAIT_TIMEOUT_S), stale
        except TimeoutError:
            raise RolloutTimeout(
                f"the rollouts of iteration {it} were not ready after {WAIT_TIMEOUT_S:g} s: "
                "the producer thread is stuck"
            ) from None

    def advance(self, it: int, state: Any, rng: Any) -> None:
        """After training iteration `it`: its weights sample iteration it + 1 + k."""
        if it + 1 + self.k <= self.end:
            self._submit([it + 1 + self.k], it, state, rng)

    def _submit(self, its, version: int, state: Any, rng: Any) -> None:
        weights = self.snapshot(state)
        for i in its:
            plan = self.prepare(i, rng)
            stale = i - 1 - version
            fut = self.producer.submit(self.produce, i, weights, plan, stale)
            self.pending[i] = (plan, fut, stale)

    def close(self) -> None:
        self.producer.close()
        self.pending.clear()


@jax.jit
def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def async_iteration(cfg, st, algo) -> tuple[Callable, RolloutPipeline]:
    """`iteration(state, rng, it, clock)` for `rl_loop.run_iterations` with rollouts from a
    `RolloutPipeline` (k = the section's `max_staleness`), and the pipeline (close it)."""
    from jaxllm.trainers.rl_iteration import learn, plan_iteration, produce

    s = getattr(cfg, cfg.stage)
    if jax.process_count() > 1:
        raise ConfigError(
            f"config key '{cfg.stage}.max_staleness': asynchronous rollouts run in one process "
            f"only ({jax.process_count()} here); use 0"
        )
    gap = make_gap_pass(st.start.graphdef, st.mesh, st.rules, s.temperature)

    def make(it, weights, plan, stale):  # the producer thread
        got = produce(cfg, st, algo, nnx.merge_state(*weights), plan[0], it)
        if stale:  # the learner at the sampling weights must agree with the sampler
            got.gap = check_gap(*jax.device_get(gap(*weights, got.batch)), s.logprob_tol)
        return got

    pipe = RolloutPipeline(
        s.max_staleness, s.checkpoint_every, s.iterations,
        prepare=lambda it, rng: plan_iteration(algo, rng, s), produce=make,
        snapshot=lambda state: _copy((state.params, state.frozen)),
    )  # fmt: skip

    def iteration(state, rng, it, clock):
        t0 = time.perf_counter()
        (recs, order), got, stale = pipe.take(it, state, rng)
        clock["wait"] = clock.get("wait", 0.0) + time.perf_counter() - t0
        clock["gen"] += got.seconds
        state, row = learn(cfg, st, algo, state, recs, got, order, clock)
        pipe.advance(it, state, rng)
        return state, {**row, "staleness": stale}

    return iteration, pipe
