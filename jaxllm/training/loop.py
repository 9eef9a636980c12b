"""The one training loop every stage runs: step, log, evaluate, checkpoint, resume.

No blocking sync inside the loop: step n's metrics are read after step n+1 is dispatched,
so the device always has the next step queued. The
exceptions are checkpoint and eval steps, where the state must be known good before it is
saved. A non-finite loss stops the run naming the step; the last checkpoint stays the last
good one.

Rates (step_time, tokens_per_s, mfu) time training steps only: each log interval's clock
starts when a step's result is read, so the first step (its JIT compile included) is logged
apart as `first_step_time`, and evaluations and saves, after which the clock starts again,
are left out. The clock reads the host time where the loop syncs anyway.

With many processes every one runs this loop in lock step (the same steps, evals and saves:
each is a collective); process 0 alone shows progress and writes metrics.

On a preemption notice (SIGTERM; `preemption.py`) a loop with a checkpointer saves the step
it is at and raises `Preempted`; the rerun resumes from that step exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
from tqdm import tqdm

from jaxllm.errors import JaxllmError
from jaxllm.training.checkpoint import Checkpointer
from jaxllm.training.metrics import MetricsWriter, plain_value
from jaxllm.training.preemption import Preempted, PreemptionWatch, defer, stop_message
from jaxllm.training.state import TrainState


class TrainingDiverged(JaxllmError):
    """The loss or gradient norm became NaN/Inf."""


@dataclass
class Watch:
    """Tracks one held-out figure across evaluations: stops the run after `patience`
    evaluations without an improvement over `min_delta` (0: never), and saves each new best
    state in `best` (a Checkpointer of its own, one step kept). Its counters go into every
    checkpoint's metadata, so a resumed run stops where the uninterrupted one would."""

    metric: str
    mode: str = "min"
    patience: int = 0
    min_delta: float = 0.0
    best: Checkpointer | None = None
    best_value: float | None = None
    best_step: int = 0
    since: int = 0  # evaluations since the best one

    def update(self, step: int, figures: dict[str, float]) -> bool:
        """Takes an evaluation's figures; True when the run should stop."""
        key = f"eval_{self.metric}"
        if key not in figures:
            raise JaxllmError(
                f"config key 'train.early_stopping.metric': '{self.metric}' is not one of this "
                f"stage's held-out figures ({', '.join(k[5:] for k in figures)})"
            )
        value = figures[key]
        sign = 1.0 if self.mode == "min" else -1.0
        if self.best_value is None or sign * (self.best_value - value) > self.min_delta:
            self.best_value, self.best_step, self.since = value, step, 0
            return False
        self.since += 1
        return 0 < self.patience <= self.since

    def state(self) -> dict[str, Any]:
        return {"best_value": self.best_value, "best_step": self.best_step, "since": self.since}

    def load(self, saved: dict[str, Any] | None) -> None:
        if saved:
            self.best_value, self.best_step, self.since = (
                saved["best_value"], saved["best_step"], saved["since"]
            )  # fmt: skip


@dataclass
class LoopSpec:
    """What a stage hands the loop."""

    step_fn: Callable[[TrainState, dict], tuple[TrainState, dict]]
    batches: Iterator[dict]  # host batches (numpy); `get_state()` if resumable
    to_device: Callable[[dict], dict]  # host batch → global sharded arrays
    total_steps: int
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 0
    checkpoint_at: tuple[int, ...] = ()  # steps saved besides every checkpoint_every-th
    eval_fn: Callable[[TrainState], dict[str, float]] | None = None
    tokens_per_step: int = 0  # for tokens/s
    flops_per_step: float = 0.0  # for MFU
    peak_flops: float = 0.0  # per-process peak used for MFU (0: no MFU)
    meta: dict[str, Any] = field(default_factory=dict)  # saved with every checkpoint
    # `state -> (tree, extra meta)` the last step saves instead of the state (e.g. a PEFT
    # run's reparameterisation folded away); None: the state, like every other step
    final_save: Callable[[TrainState], tuple[Any, dict[str, Any]]] | None = None
    progress: bool = True
    desc: str = "train"
    watch: Watch | None = None  # early stopping / the best checkpoint (train.early_stopping)


def run_loop(
    spec: LoopSpec, state: TrainState, checkpointer: Checkpointer | None, run_dir: Path
) -> tuple[TrainState, dict[str, Any]]:
    """Runs from `state.step` to `spec.total_steps`; returns the state and final figures."""
    start = int(state.step)
    writer = MetricsWriter(run_dir, resume_step=start)
    bar = tqdm(
        total=spec.total_steps,
        initial=start,
        desc=spec.desc,
        disable=not spec.progress or jax.process_index() != 0,
        dynamic_ncols=True,
        leave=True,
    )
    last: dict[str, Any] = {}
    pending: tuple[int, dict] | None = None
    meta = checkpointer.read_meta(start) if checkpointer and start else {}
    if spec.watch and meta:
        spec.watch.load(meta.get("watch"))
    end = start if meta.get("stopped_early") else spec.total_steps  # it stopped: no more steps
    clock = _Clock(spec)
    clock.resume(meta.get("log_interval"))  # a preempted run's unfinished log interval
    preemption = PreemptionWatch(enabled=checkpointer is not None)
    preempted = False
    try:
        preemption.install()
        for step in range(start + 1, end + 1):
            batch = spec.to_device(next(spec.batches))
            state, metrics = spec.step_fn(state, batch)
            preempted = preemption.reached(step)  # every process, every step
            if pending is not None:  # read the previous step while this one runs
                last = _log(spec, writer, bar, clock, *pending) or last
            pending = (step, metrics)
            saved = False
            if _save_due(spec, step) or _due(step, spec.eval_every, spec.total_steps):
                last = _log(spec, writer, bar, clock, *pending, force=True) or last
                pending = None
                figures = _evaluate(spec, state, step, writer)
                last.update(figures)
                stop = _watch(spec, state, step, figures)
                if checkpointer and (stop or _save_due(spec, step)):
                    writer.flush()  # every row up to the checkpoint on disk before it exists
                    _save(spec, checkpointer, state, step, final=stop)
                    saved = True
                if stop:
                    last["stopped_early_at"] = step
                    break
                clock.restart()  # the evaluation and the save are no training time
            preempted = preempted or (saved and preemption.noticed())  # came during the save
            if preempted and checkpointer and step < end:  # at the end: finish the stage
                if pending is not None:  # the log interval goes on after the resume
                    last = _log(spec, writer, bar, clock, *pending) or last
                    pending = None
                if not saved:
                    writer.flush()
                    _save(spec, checkpointer, state, step, interval=clock.partial())
                checkpointer.wait()
                raise Preempted(
                    stop_message(f"step {step}", f"checkpoint {checkpointer.directory}/{step}")
                )
        if preempted or preemption.noticed():  # at the last step or an early stop: the stage
            defer()  # finishes, and the process starts no other loop (`check_deferred`)
        if pending is not None:
            last = _log(spec, writer, bar, clock, *pending, force=True) or last
        if start >= end:
            # resumed from the final checkpoint (the run died before its summary): the last
            # training figures from metrics.jsonl, the final held-out ones again
            last.update(writer.last_row("loss"))
            if spec.eval_fn is not None:
                last.update({f"eval_{k}": v for k, v in spec.eval_fn(state).items()})
            if meta.get("stopped_early"):
                last["stopped_early_at"] = start
    finally:
        preemption.remove()
        bar.close()
        writer.close()
        for ckpt in (checkpointer, spec.watch and spec.watch.best):
            if ckpt:
                ckpt.wait()
    if spec.watch and spec.watch.best_value is not None:
        last.update(best_step=spec.watch.best_step, best_value=spec.watch.best_value)
    return state, last


def _watch(spec: LoopSpec, state: TrainState, step: int, figures: dict) -> bool:
    """Early stopping and the best checkpoint after an evaluation; True: stop now."""
    if spec.watch is None or not figures:
        return False
    stop = spec.watch.update(step, figures)
    if spec.watch.best is not None and spec.watch.best_step == step:
        # what a later stage loads, never resumed from: folded like a last checkpoint
        tree, extra = spec.final_save(state) if spec.final_save else (state, {})
        spec.watch.best.drop_from(step)  # a killed run's best at this step or later
        spec.watch.best.save(step, tree, dict(spec.meta, step=step, **extra))
    return stop


def _due(step: int, every: int, total: int) -> bool:
    return step == total or (every > 0 and step % every == 0)


def _save_due(spec: LoopSpec, step: int) -> bool:
    return _due(step, spec.checkpoint_every, spec.total_steps) or step in spec.checkpoint_at


def _evaluate(spec: LoopSpec, state: TrainState, step: int, writer: MetricsWriter) -> dict:
    if spec.eval_fn is None or not _due(step, spec.eval_every, spec.total_steps):
        return {}
    figures = {f"eval_{k}": v for k, v in spec.eval_fn(state).items()}
    writer.write(step, figures)
    return figures


def _save(
    spec: LoopSpec, ckpt: Checkpointer, state: TrainState, step: int, final: bool = False,
    interval: dict | None = None,
) -> None:  # fmt: skip
    """Saves the state (or at the last step, or a `final` one such as an early stop, what
    `final_save` makes of it), and each process's own data position with it; `interval`: the
    unfinished log interval's sums (a preemption between log steps), for the resumed run."""
    data = spec.batches if hasattr(spec.batches, "get_state") else None
    tree, extra = state, {}
    if spec.final_save is not None and (final or step == spec.total_steps):
        tree, extra = spec.final_save(state)
    watch = {"watch": spec.watch.state()} if spec.watch else {}
    if final:
        watch["stopped_early"] = True  # a rerun after a crash trains no further
    if interval:
        watch["log_interval"] = interval
    ckpt.save(step, tree, dict(spec.meta, step=step, **watch, **extra), data=data)


_now = time.perf_counter  # the clock's time source (a test's fake clock replaces it)


class _Clock:
    """Per-log-interval means of the step metrics, and rates over the steps timed.

    `add` runs when a step's result has reached the host: with the next step already queued,
    the time from one `add` to the next is one step's. The first step's own time (its
    compile) is `first_step_time`; `restart` after an evaluation or a save starts the clock
    again, so the interval's rates count the steps dispatched after it alone."""

    def __init__(self, spec: LoopSpec) -> None:
        self.spec = spec
        self.t = _now()  # just before the first step is dispatched
        self.first = True
        self.steps = 0  # steps in the interval's means
        self.timed = 0  # of them, those wholly after `t`
        self.sums: dict[str, float] = {}
        self.extra: dict[str, float] = {}

    def add(self, host: dict[str, float]) -> None:
        now = _now()
        if self.first:  # the compile and the first step: apart, and the clock starts now
            self.extra["first_step_time"] = now - self.t
            self.first, self.t = False, now
        else:
            self.timed += 1
        self.steps += 1
        for k, v in host.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def partial(self) -> dict[str, Any] | None:
        """The steps and metric sums since the last logged row (None: none)."""
        return {"steps": self.steps, "sums": dict(self.sums)} if self.steps else None

    def resume(self, saved: dict[str, Any] | None) -> None:
        """Takes `partial()` of a preempted run, so the next row's means span the whole
        interval, as the uninterrupted run's do."""
        if saved:
            self.steps, self.sums = int(saved["steps"]), dict(saved["sums"])

    def restart(self) -> None:
        """After an evaluation or a save (just after a logged row): the clock starts now."""
        self.t, self.timed = _now(), 0

    def means(self) -> dict[str, float]:
        """Averages since the last call (so a logged loss is the interval's mean), and rates
        (none when no step of the interval was timed: the first step's alone)."""
        now = _now()
        out = {k: v / max(self.steps, 1) for k, v in self.sums.items()}
        out.update(self.extra)
        if self.timed:
            dt, n = max(now - self.t, 1e-9), self.timed
            out["step_time"] = dt / n
            if self.spec.tokens_per_step:
                out["tokens_per_s"] = self.spec.tokens_per_step * n / dt
            if self.spec.flops_per_step and self.spec.peak_flops:
                out["mfu"] = self.spec.flops_per_step * n / dt / self.spec.peak_flops
        self.t, self.steps, self.timed, self.sums, self.extra = now, 0, 0, {}, {}
        return out


def _log(spec, writer, bar, clock, step: int, metrics: dict, force: bool = False):
    bar.update(1)
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not (math.isfinite(host.get("loss", 0.0)) and math.isfinite(host.get("grad_norm", 0.0))):
        raise TrainingDiverged(
            f"step {step}: loss is {host.get('loss')} (grad norm {host.get('grad_norm')}); "
            "stopped — the last checkpoint is the last good state; lower optim.lr or "
            "check the data"
        )
    clock.add(host)
    if not force and step % max(spec.log_every, 1):
        return None
    row = clock.means()
    row["lr"] = host.get("lr", row.get("lr"))  # the current lr, not the interval's mean
    row = {k: plain_value(v) for k, v in row.items()}  # the summary says what the file says
    writer.write(step, row)
    bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row.get('tokens_per_s', 0):.0f}")
    return row
