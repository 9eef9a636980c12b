"""Run metrics: `metrics.jsonl` (one object per logged step), TensorBoard events and a
loss-curve PNG. Only process 0 writes.

A run directory in a bucket (`gs://...`) cannot be appended to: there `metrics.jsonl` is kept
in memory and the whole object rewritten at most every `REMOTE_FLUSH_S` seconds and on close.
TensorBoard events reach the disk every `TB_FLUSH_S` seconds (a bucket's: `REMOTE_FLUSH_S`).
`flush()` puts every row so far on disk: the loop calls it before each checkpoint, so a run
killed after a checkpoint has all the steps it resumes after, in both files.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

import jax

from jaxllm.config import is_remote, storage_path
from jaxllm.jsonl import BadLine, parse_line, read_jsonl

REMOTE_FLUSH_S = 60.0
TB_FLUSH_S = 10.0


class MetricsWriter:
    """Appends step metrics; on resume drops lines past the restored step first."""

    def __init__(self, run_dir: Path, resume_step: int = 0, tensorboard: bool = True) -> None:
        self.path = storage_path(run_dir) / "metrics.jsonl"
        self.enabled = jax.process_index() == 0
        self.remote = is_remote(self.path)
        self.lines: list[str] = []  # a remote file's whole text, line by line
        self.flushed = time.monotonic()
        self.tb = None
        if not self.enabled:
            return
        self._truncate_after(resume_step)
        if tensorboard:
            self.tb = _Events(
                storage_path(run_dir) / "tensorboard", resume_step + 1 if resume_step else 0
            )

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = [ln + "\n" for ln in self.path.read_text().splitlines() if _step(ln) <= step]
        self.path.write_text("".join(keep))
        self.lines = keep if self.remote else []

    def last_row(self, key: str) -> dict[str, Any]:
        """The newest row holding `key` (without its step), {} if none: a run resumed at its
        end reads its final training figures back."""
        if not self.enabled or not self.path.exists():
            return {}
        for line in reversed(self.path.read_text().splitlines()):
            row = json.loads(line)
            if key in row:
                return {k: v for k, v in row.items() if k != "step"}
        return {}

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: plain_value(v) for k, v in metrics.items()}}
        line = json.dumps(row) + "\n"
        if self.remote:
            self.lines.append(line)
            if time.monotonic() - self.flushed > REMOTE_FLUSH_S:
                self._flush()
        else:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line)
        if self.tb is not None:
            scalars = {k: v for k, v in row.items() if k != "step" and _scalar(v)}
            self.tb.write(step, scalars)

    def flush(self) -> None:
        """Puts every row written so far on disk (a local metrics.jsonl already is)."""
        if self.enabled and self.remote:
            self._flush()
        if self.tb is not None:
            self.tb.flush()

    def _flush(self) -> None:
        self.path.write_text("".join(self.lines))
        self.flushed = time.monotonic()

    def close(self) -> None:
        if self.enabled and self.remote:
            self._flush()
        if self.tb is not None:
            self.tb.close()


def _scalar(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


class _Events:
    """TensorBoard scalars written in the calling thread, one event per row, through
    tensorboardX's record writer (its TFRecord framing, local or `gs://`): `flush()` puts
    every row so far on disk. (tensorboardX's `SummaryWriter` hands its events to a thread
    through a queue, and its `flush()` leaves the queued ones in memory.) A resumed run's file
    starts with a `SessionLog.START` at `purge_step`: TensorBoard hides the events a killed
    run logged at that step or later."""

    def __init__(self, log_dir: Path, purge_step: int = 0) -> None:
        record_writer, event_pb2, summary_pb2 = _tensorboardx()
        self._Event, self._Summary = event_pb2.Event, summary_pb2.Summary
        record_writer.directory_check(str(log_dir))
        # a resumed run's own file, sorting after the killed run's (TensorBoard reads them in
        # name order), even when both start within a second
        name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
        self._out = record_writer.RecordWriter(f"{log_dir}/{name}")
        self._add(self._Event(file_version="brain.Event:2"))
        if purge_step:
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._add(self._Event(step=purge_step, session_log=start))
        self.every = REMOTE_FLUSH_S if is_remote(log_dir) else TB_FLUSH_S
        self.flush()

    def _add(self, event) -> None:
        event.wall_time = time.time()
        self._out.write(event.SerializeToString())

    def write(self, step: int, scalars: dict[str, float]) -> None:
        values = [self._Summary.Value(tag=_tag(k), simple_value=v) for k, v in scalars.items()]
        if values:
            self._add(self._Event(step=step, summary=self._Summary(value=values)))
        if time.monotonic() - self.flushed > self.every:
            self.flush()

    def flush(self) -> None:
        self._out.flush()
        self.flushed = time.monotonic()

    def close(self) -> None:
        self._out.close()


def _tag(name: str) -> str:
    """A metric's name as tensorboardX's `add_scalar` writes it (other characters as `_`)."""
    return re.sub(r"[^-/\w.]", "_", name).lstrip("/")


def _tensorboardx():
    """tensorboardX's record writer and protos, imported without torch: the package's
    `__init__` imports its writer module, which imports torch when installed (1.4–2.5 s and
    180 MB at every stage start, e.g. on Colab, where torch comes preinstalled) only to accept
    torch tensors, and we log Python floats. A `None` entry in `sys.modules` makes that
    `import torch` fail as if absent; it is removed again at once, so a later `import torch`
    elsewhere works as usual."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        from tensorboardX import record_writer
        from tensorboardX.proto import event_pb2, summary_pb2
    finally:
        if hide:
            del sys.modules["torch"]
    return record_writer, event_pb2, summary_pb2


def read_metrics(path: Path) -> list[dict[str, Any]]:
    path = storage_path(path)
    if not path.exists():
        return []
    if is_remote(path):
        return [parse_line(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return [row for _, row in read_jsonl(path)]


def plot_losses(metrics_path: Path, out_png: Path, title: str = "") -> Path | None:
    """Train loss (and eval loss where logged) against step, as a PNG (process 0 only)."""
    if jax.process_index() != 0:
        return None
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for key, style in (("loss", "-"), ("eval_loss", "o-")):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
        if pts:
            ax.plot(*zip(*pts), style, label=key, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png = storage_path(out_png)
    if is_remote(out_png):
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        out_png.write_bytes(buf.getvalue())
    else:
        fig.savefig(out_png)
    plt.close(fig)
    return out_png


def _step(line: str) -> int:
    try:
        return int(parse_line(line).get("step", 0))
    except (BadLine, ValueError, TypeError):
        return 1 << 62  # unreadable (torn) line: drop it


def plain_value(v: Any) -> Any:
    """A metric as metrics.jsonl holds it: a Python number, floats to 6 decimals."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float):
        return round(v, 6) if math.isfinite(v) else str(v)
    return v
