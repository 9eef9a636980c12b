"""The run directory contract: `config.yaml`, `summary.json`, `metrics.jsonl`, checkpoints.

A run is *finished* once `summary.json` exists (written last, atomically). A finished run is
never replaced unless the config says `overwrite: true`; an unfinished one with the same config
is resumed; an unfinished one with a different config is refused, naming the first key that
differs, so one run never silently writes over another's outputs. A run that stopped before
any output (a wrong input path) left only `config.yaml` and its kept tokenizer: it starts over.

A run that writes checkpoints holds its tokenizer (`tokenizer.model`, or `tokenizer/` with the
`tokenizer.json` files; `trainers.lm.keep_tokenizer`), and checkpoint metadata names it, and a
LoRA run's base checkpoint, relative to `checkpoints/` (`training.checkpoint.PATH_KEYS`): a run
directory can be moved, copied or read from any working directory (a LoRA run moves together
with its base's run).

Many processes, one run directory: process 0 alone decides (finished, resumed, refused),
removes and writes it — `config.yaml`, `summary.json`, logs, plots — and tells the others its
decision, so they act on the same one and fail with the same message; checkpoints are written
by every process (orbax). An `output_dir` such as `gs://bucket/run` is written through
`etils.epath` (see `config.storage_path`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from jaxllm.config import Config, dump_yaml, is_remote, storage_path, to_dict
from jaxllm.errors import JaxllmError, RunDirError

# Keys that may differ between a run and its resumption: they do not change its results, or
# (the mesh: a preempted run back on another slice) only by the float rounding of other
# reduction orders; a checkpoint restores onto any mesh.
_RESUME_FREE_KEYS = {"overwrite", "progress", "mesh"}


def atomic_write_text(path: Path, text: str) -> None:
    """Writes `text` so readers see the old file or the whole new one, never a torn one
    (a bucket object is replaced whole by its nature)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """`atomic_write_text` for bytes (e.g. an `.npy` file)."""
    path = storage_path(path)
    if is_remote(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def is_finished(path: Path) -> bool:
    """A jaxllm run that wrote its summary: `summary.json` beside its `config.yaml` (a folder
    of another tool's that holds a summary.json is no run, and never replaced)."""
    path = storage_path(path)
    return (path / "summary.json").is_file() and (path / "config.yaml").is_file()


def read_summary(path: Path) -> dict[str, Any]:
    return json.loads((storage_path(path) / "summary.json").read_text(encoding="utf-8"))


def is_primary() -> bool:
    """Whether this process writes the run's files: process 0 (the only one, usually)."""
    import jax  # local: `import jaxllm.rundir` stays light

    return jax.process_index() == 0


def primary_decides(fn: Callable[..., Any], *args: Any) -> Any:
    """Runs `fn(*args)` (JSON out) on process 0 only and returns its result on every
    process; an error for people (`JaxllmError`) it raises is raised on every process, with
    its message (as itself on process 0, as a `JaxllmError` elsewhere), so no process waits
    forever for one that has stopped."""
    from jaxllm.sharding.multihost import from_primary

    out: dict[str, Any] = {}
    error: JaxllmError | None = None
    if is_primary():
        try:
            out = {"value": fn(*args)}
        except JaxllmError as e:
            error, out = e, {"error": str(e)}
    out = from_primary(out)
    if error is not None:
        raise error
    if "error" in out:
        raise JaxllmError(out["error"])
    return out["value"]


def check_same_across_processes(cfg: Config) -> None:
    """Fails, on every process, when the processes were given different configs (naming
    the first key that differs); `progress` may differ."""
    from jaxllm.sharding.multihost import check_same

    def explain(a: str, b: str) -> str | None:
        return first_difference(yaml.safe_load(a), yaml.safe_load(b))

    mine = {k: v for k, v in to_dict(cfg).items() if k != "progress"}
    check_same("config", yaml.safe_dump(mine, sort_keys=True), explain)


class RunDir:
    """An opened run directory; `finish(summary)` marks the run done."""

    def __init__(self, path: Path, resumed: bool = False) -> None:
        self.path = storage_path(path)
        self.resumed = resumed
        self.started = time.time()

    @classmethod
    def open(cls, cfg: Config) -> RunDir:
        """Creates or resumes `cfg.run_dir`, refusing to replace another run's outputs.
        Process 0 decides and writes; every process returns once it has."""
        return cls(cfg.run_dir, primary_decides(_prepare, cfg))

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Writes `summary.json` (process 0) and returns the summary once every process is
        done with the stage, so a next stage never reads a file not yet written."""
        summary = {**summary, "seconds": round(time.time() - self.started, 2)}
        if is_primary():
            atomic_write_json(self.path / "summary.json", summary)
        from jaxllm.sharding.multihost import barrier

        barrier(f"finish {self.path}")
        return summary


def _prepare(cfg: Config) -> bool:
    """Makes `cfg.run_dir` ready (process 0): whether the run resumes."""
    path = cfg.run_dir
    resumed = False
    if is_finished(path):
        if not cfg.overwrite:
            raise RunDirError(
                f"{path} holds a finished run; set overwrite: true "
                "(--set overwrite=true) to replace it, or choose another output_dir"
            )
        _rmtree(path)
    elif path.exists() and _not_started({p.name for p in path.iterdir()}):
        pass  # empty, or a run that failed before writing anything: nothing to keep
    elif path.exists():
        if cfg.overwrite and (path / "config.yaml").is_file():  # a jaxllm run, unfinished
            _rmtree(path)
        else:
            check_same_config(path, cfg)
            resumed = True
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path / "config.yaml", dump_yaml(cfg))
    return resumed


# What a stage writes before it checks its inputs: its config and the tokenizer it keeps
# (`trainers.lm.keep_tokenizer`), which the stage writes again when it starts over.
_KEPT_TOKENIZER = {"tokenizer.model", "tokenizer"}


def _not_started(names: set[str]) -> bool:
    """Whether a directory holding `names` is empty or a run that failed before any output
    (a wrong input path): only `config.yaml`, and beside it at most the kept tokenizer."""
    return names <= {"config.yaml"} or (
        "config.yaml" in names and names <= {"config.yaml"} | _KEPT_TOKENIZER
    )


def _rmtree(path: Path) -> None:
    if is_remote(path):
        path.rmtree()
    else:
        shutil.rmtree(path)


def check_same_config(path: Path, cfg: Config) -> None:
    old_file = path / "config.yaml"
    if not old_file.is_file():
        raise RunDirError(
            f"{path} exists, is not empty and holds no jaxllm run (no config.yaml); "
            "choose another output_dir (overwrite only replaces a jaxllm run)"
        )
    old = yaml.safe_load(old_file.read_text(encoding="utf-8")) or {}
    diff = first_difference(old, to_dict(cfg), defaults=_defaults())
    if diff:
        state = "a finished" if is_finished(path) else "an unfinished"
        raise RunDirError(
            f"{path} holds {state} run with another config ({diff}); "
            "set overwrite: true to start over, or choose another output_dir"
        )


def _defaults() -> dict[str, Any]:
    """Every config key's default value (as `to_dict` writes them)."""
    from jaxllm.config import from_dict

    return to_dict(from_dict({"stage": "pretrain"}))


def first_difference(old: Any, new: Any, prefix: str = "", defaults: Any = None) -> str | None:
    """The first dotted key whose value differs, as 'key: old -> new', or None. A key the old
    config lacks (a run written before jaxllm had it) counts as equal when the new value is
    its default in `defaults`: the old run ran with that default's behaviour."""
    if isinstance(old, dict) and isinstance(new, dict):
        defaults = defaults if isinstance(defaults, dict) else {}
        for key in list(old) + [k for k in new if k not in old]:
            if key in _RESUME_FREE_KEYS:
                continue
            if key not in old and key in defaults and new[key] == defaults[key]:
                continue
            where = f"{prefix}.{key}" if prefix else str(key)
            # a pipeline's stages are whole configs: each has the root's defaults
            sub = defaults if key == "pipeline" and "pipeline" in defaults else defaults.get(key)
            d = first_difference(old.get(key), new.get(key), where, sub)
            if d:
                return d
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            d = first_difference(a, b, f"{prefix}.{i}", defaults)
            if d:
                return d
        return None
    return None if old == new else f"{prefix}: {old!r} -> {new!r}"
