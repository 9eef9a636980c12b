"""The training loop's reporting, on a fake device with a fake clock: rates time the training
steps alone (no compile, evaluation or save in them) and the loop still reads each step's
result only after the next is queued; every logged row is on disk, TensorBoard's too, before
a checkpoint is written. A SIGTERM makes the loop save the step it is at and stop."""

import json
import os
import signal
from dataclasses import dataclass

import numpy as np
import pytest

from jaxllm.training import loop as loop_mod
from jaxllm.training import preemption
from jaxllm.training.loop import LoopSpec, run_loop
from jaxllm.training.metrics import read_metrics
from jaxllm.training.preemption import Preempted
from tests.training.test_metrics import tb_scalars

STEP_S, COMPILE_S, EVAL_S, SAVE_S = 1.0, 50.0, 100.0, 7.0


class FakeDevice:
    """A device running the dispatched steps one after another, `STEP_S` each; the host waits
    (its clock jumps) only where it reads a result. The first dispatch compiles on the host."""

    def __init__(self):
        self.host = 0.0
        self.done = 0.0  # when the last dispatched step finishes
        self.dispatched = 0
        self.reads: list[tuple[int, int]] = []  # (step read, steps dispatched by then)

    def step(self, state, batch):
        if self.dispatched == 0:
            self.host += COMPILE_S
        self.dispatched += 1
        self.done = max(self.host, self.done) + STEP_S
        return State(state.step + 1), {"loss": Result(self, self.dispatched, self.done)}

    def sync(self, extra: float = 0.0) -> None:
        self.host = max(self.host, self.done) + extra


@dataclass
class State:
    step: int


@dataclass
class Result:
    device: FakeDevice
    step: int
    ready: float

    def __float__(self) -> float:
        d = self.device
        if not d.reads or d.reads[-1][0] != self.step:
            d.reads.append((self.step, d.dispatched))
        d.host = max(d.host, self.ready)
        return 1.0


class FakeCheckpointer:
    def __init__(self, device, run_dir):
        self.device, self.run_dir, self.on_disk = device, run_dir, {}
        self.directory = run_dir / "checkpoints"
        self.meta = {}

    def save(self, step, state, meta, data=None):
        self.meta[step] = meta
        # what a run killed right now would have left, then the save's own time
        tb = [s for s, _ in tb_scalars(self.run_dir / "tensorboard").get("loss", [])]
        rows = [r["step"] for r in read_metrics(self.run_dir / "metrics.jsonl") if "loss" in r]
        self.on_disk[step] = (tb, rows)
        self.device.sync(SAVE_S)

    def wait(self):
        pass


def test_rates_time_training_steps_only_and_rows_reach_disk_before_a_checkpoint(
    tmp_path, monkeypatch
):
    dev = FakeDevice()
    monkeypatch.setattr(loop_mod, "_now", lambda: dev.host)
    tokens, flops, peak = 64, 2.0e3, 1.0e3
    spec = LoopSpec(
        step_fn=dev.step, batches=iter(lambda: {}, None), to_device=lambda b: b,
        total_steps=30, log_every=5, eval_every=10, checkpoint_every=15,
        eval_fn=lambda s: dev.sync(EVAL_S) or {"loss": 2.0}, tokens_per_step=tokens,
        flops_per_step=flops, peak_flops=peak, progress=False,
    )  # fmt: skip
    ckpt = FakeCheckpointer(dev, tmp_path)
    run_loop(spec, State(0), ckpt, tmp_path)

    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    # each interval: one step's time per step, whatever came before it (compile, eval, save)
    for r in rows:
        assert r["step_time"] == pytest.approx(STEP_S), r
        assert r["tokens_per_s"] == pytest.approx(tokens / STEP_S), r
        assert r["mfu"] == pytest.approx(flops / STEP_S / peak), r
    assert rows[0]["first_step_time"] == pytest.approx(COMPILE_S + STEP_S)
    assert all("first_step_time" not in r for r in rows[1:])
    # no sync inside a step: step k is read once step k+1 is queued, except where the loop
    # must know the state (an evaluation, a save, the last step)
    forced = {10, 15, 20, 30}
    assert [k for k, n in dev.reads if n != k + 1] == sorted(forced)
    # at each checkpoint every row up to it is on disk, in metrics.jsonl and in TensorBoard
    for step in (15, 30):
        tb, jsonl = ckpt.on_disk[step]
        expect = [s for s in (5, 10, 15, 20, 25, 30) if s <= step]
        assert tb == expect and jsonl == expect, (step, tb, jsonl)


def test_an_interval_of_the_first_step_alone_has_no_rates(tmp_path, monkeypatch):
    dev = FakeDevice()
    monkeypatch.setattr(loop_mod, "_now", lambda: dev.host)
    spec = LoopSpec(
        step_fn=dev.step, batches=iter(lambda: {}, None), to_device=lambda b: b,
        total_steps=3, log_every=1, tokens_per_step=8, progress=False,
    )  # fmt: skip
    run_loop(spec, State(0), None, tmp_path)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[0]["first_step_time"] == pytest.approx(COMPILE_S + STEP_S)
    assert "tokens_per_s" not in rows[0] and "step_time" not in rows[0]
    assert [r["tokens_per_s"] for r in rows[1:]] == pytest.approx([8 / STEP_S] * 2)


def _sigterm_spec(dev, at=0, log_every=5):
    def step(state, batch):
        if state.step + 1 == at:  # the notice arrives while step `at` is dispatched
            os.kill(os.getpid(), signal.SIGTERM)
        return dev.step(state, batch)

    return LoopSpec(
        step_fn=step, batches=iter(lambda: {}, None), to_device=lambda b: b,
        total_steps=30, log_every=log_every, checkpoint_every=15, progress=False,
    )  # fmt: skip


@pytest.mark.parametrize("at", [7, 15, "save"])  # between checkpoints; at one; during its save
def test_sigterm_saves_the_step_it_arrives_in_and_stops(tmp_path, monkeypatch, at):
    dev = FakeDevice()
    monkeypatch.setattr(loop_mod, "_now", lambda: dev.host)
    ckpt = FakeCheckpointer(dev, tmp_path)
    if at == "save":  # a notice during the scheduled save at 15: stop there, save once
        at, save = 15, ckpt.save
        ckpt.save = lambda *a, **k: (save(*a, **k), os.kill(os.getpid(), signal.SIGTERM))
        spec = _sigterm_spec(dev)
    else:
        spec = _sigterm_spec(dev, at)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match=rf"after step {at}: checkpoint .*checkpoints/{at};"):
        run_loop(spec, State(0), ckpt, tmp_path)
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the loop's alone
    assert list(ckpt.on_disk) == [at]  # saved once, at that step, and no step after it ran
    assert dev.dispatched == at
    tb, jsonl = ckpt.on_disk[at]
    expect = [s for s in (5, 10, 15) if s <= at]  # no row off the log grid
    assert tb == expect and jsonl == expect, (tb, jsonl)
    # the unfinished interval (steps 6, 7) goes into the checkpoint for the resumed run
    assert ckpt.meta[at].get("log_interval") == (
        {"steps": 2, "sums": {"loss": 2.0}} if at == 7 else None
    )


def test_sigterm_at_the_last_step_finishes_the_stage(tmp_path, monkeypatch):
    dev = FakeDevice()
    monkeypatch.setattr(loop_mod, "_now", lambda: dev.host)
    ckpt = FakeCheckpointer(dev, tmp_path)
    run_loop(_sigterm_spec(dev, 30), State(0), ckpt, tmp_path)  # no Preempted: it is done
    assert list(ckpt.on_disk) == [15, 30]
    # ... but the process starts no other loop: a pipeline's next stage stops before it starts
    with pytest.raises(Preempted, match="the stage before it finished: stage 2 .* not started"):
        preemption.check_deferred("stage 2 (sft)")
    preemption.check_deferred("stage 3")  # once: the notice was acted on


def test_a_resumed_log_interval_means_the_whole_interval():
    """The row after a preemption between log steps averages every step of its interval, as
    the uninterrupted run's row does (steps 1, 2 before the stop; 3, 4, 5 after)."""
    spec = LoopSpec(step_fn=None, batches=None, to_device=None, total_steps=5, progress=False)
    first = loop_mod._Clock(spec)
    for loss in (1.0, 2.0):
        first.add({"loss": loss})
    second = loop_mod._Clock(spec)
    second.resume(json.loads(json.dumps(first.partial())))  # through the checkpoint's JSON
    for loss in (3.0, 4.0, 5.0):
        second.add({"loss": loss})
    assert second.means()["loss"] == pytest.approx(np.mean([1, 2, 3, 4, 5]))


@pytest.mark.parametrize(
    "client, manager, processes, mode",
    [(None, None, 1, "local"), (object(), object(), 2, "service"), (object(), None, 1, "local"),
     (object(), None, 2, "off")],
)  # fmt: skip
def test_preemption_mode_follows_jax_distributed(monkeypatch, client, manager, processes, mode):
    """jax's preemption service when the processes joined with it; without it (turned off)
    one process handles SIGTERM itself and several leave it alone (a lone save would hang)."""
    import jax
    from jax._src import distributed

    from jaxllm.training import preemption

    monkeypatch.setattr(distributed.global_state, "client", client)
    monkeypatch.setattr(distributed.global_state, "preemption_sync_manager", manager)
    monkeypatch.setattr(jax, "process_count", lambda: processes)
    assert preemption._mode() == mode
