"""Helpers for tests with real processes: `launch` starts N copies of `python -m jaxllm.main`
joined by `jax.distributed` over a localhost coordinator (CPU devices, gloo collectives),
each logging the files it writes (tests/audit_writes.py); `as_if_processes` makes a
single-process run read the same global batches N processes read, for reference runs."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class Group:
    """N processes of one multi-process run; `wait()` returns their outputs."""

    def __init__(
        self,
        args: list[str],
        logs: Path,
        n: int = 2,
        devices: int = 4,
        extra: dict[int, list[str]] | None = None,
        module: str = "",
        more_env: dict[str, str] | None = None,
    ) -> None:
        """`extra[i]`: arguments only process `i` gets (to make processes disagree);
        `module`: run `python -m module ARGS` instead of jaxllm.main under the write audit;
        `more_env`: more environment variables for every process."""
        logs.mkdir(parents=True, exist_ok=True)
        self.logs, self.n = logs, n
        port = free_port()
        self.procs = []
        for i in range(n):
            env = {
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "JAX_PLATFORMS": "cpu",
                "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
                "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                "JAX_NUM_PROCESSES": str(n),
                "JAX_PROCESS_ID": str(i),
                **(more_env or {}),
            }
            out = (logs / f"out{i}.txt").open("a")
            audit = ["tests.audit_writes", str(logs / f"writes{i}.jsonl")]
            cmd = [sys.executable, "-m", *([module] if module else audit)]
            self.procs.append(
                subprocess.Popen(
                    [*cmd, *args, *(extra or {}).get(i, [])],
                    cwd=ROOT,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )

    def wait(self, timeout: float = 300, code: int = 0) -> list[str]:
        """Waits for every process (killing all on a timeout); asserts each exited with
        `code`; returns their outputs."""
        deadline = time.time() + timeout
        try:
            for p in self.procs:
                p.wait(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            pass
        finally:
            self.kill()
        outs = self.outputs()
        for i, p in enumerate(self.procs):
            assert p.returncode == code, f"process {i} exited {p.returncode}:\n{outs[i][-3000:]}"
        return outs

    def outputs(self) -> list[str]:
        return [(self.logs / f"out{i}.txt").read_text() for i in range(self.n)]

    def kill(self) -> None:
        """SIGKILL to every process still running (as a crashed host would stop)."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        for p in self.procs:
            p.wait()

    def kill_when(self, path: Path, timeout: float = 300) -> None:
        """SIGKILLs all processes as soon as `path` exists (e.g. a checkpoint directory)."""
        deadline = time.time() + timeout
        while not path.exists() and time.time() < deadline:
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.01)
        self.kill()

    def writes(self, i: int) -> list[dict]:
        """What process `i` created, wrote, renamed or removed (paths relative to WATCH)."""
        log = self.logs / f"writes{i}.jsonl"
        return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def main_args(config: str, watch: Path, sets: dict) -> list[str]:
    """tests.audit_writes's arguments: the watched directory, then jaxllm.main's."""
    flat = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    return [str(watch), "--config", config, *flat]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def series(run_dir: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in metrics(run_dir) if key in r}


class _Merged:
    """The batches of N per-process datasets, each process's rows after the previous one's,
    as `jax.make_array_from_process_local_data` lays them out; a process whose stream ended
    contributes all-padding rows (as the multi-process eval tops up with)."""

    def __init__(self, parts: list) -> None:
        self.parts = parts

    def __iter__(self) -> Iterator[dict]:
        for group in itertools.zip_longest(*map(iter, self.parts)):
            like = next(b for b in group if b is not None)
            full = [b if b is not None else {k: np.zeros_like(v) for k, v in like.items()}
                    for b in group]  # fmt: skip
            yield {k: np.concatenate([b[k] for b in full]) for k in like}


def as_if_processes(make: Callable, n: int) -> Callable:
    """`make` (a per-process dataset builder taking `process_index`/`process_count`) as a
    single process calls it, returning what N processes would read together."""

    def make_all(*args, process_index: int = 0, process_count: int = 1, **kwargs):
        assert (process_index, process_count) == (0, 1)
        return _Merged([make(*args, process_index=i, process_count=n, **kwargs) for i in range(n)])

    return make_all
