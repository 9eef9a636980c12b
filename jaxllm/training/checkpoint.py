"""orbax checkpoints of the whole run: train state, data-iterator state and metadata.

Every process takes part in a save and a restore: each writes its shards of the state and its
own data-iterator position (item `data`: grain's handler, one `process_<i>-of-<n>.json` per
process, since each process reads its own slice of the data), and process 0 writes the JSON
metadata. A resume restores each process's own position, so it needs the same number of
processes. Checkpoints written before per-process data state kept process 0's in the metadata
(`data_state`); those still restore, on one process.

The directory may be a bucket (`gs://...`): orbax writes there through `etils.epath`.

Saves are async and atomic (orbax writes to a temporary directory and renames it when the
save is complete), keeping the newest `keep` steps. A restore checks the saved shapes against
the model first, so a checkpoint of another model fails with a message naming the parameter.

Metadata values that name files (`PATH_KEYS`: the tokenizer, a LoRA run's base checkpoint) are
stored relative to the checkpoint directory, with the absolute path beside them as a fallback
(`<key>_absolute`), and read back as paths that exist from any working directory: a run
directory (or a whole tree of runs) can be moved or copied and its checkpoints still load.
Checkpoints written before this kept cwd-relative values; those still resolve from the cwd.

A `TrainState`'s `frozen` part (LoRA's base weights, a stage's fixed parts) is never written:
it is rebuilt from the stage's inputs, so a LoRA checkpoint holds only the adapters (and their
optimizer state). `restore` returns the state with `frozen=None`; the caller puts it back.
`restore_params` reads the weights alone, for a model loaded to use rather than to resume.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from jaxllm.config import is_remote, storage_path
from jaxllm.errors import JaxllmError
from jaxllm.training.state import TrainState

PATH_KEYS = ("tokenizer", "base_checkpoint")  # metadata values that are file paths


def _whole_replica_writes_on_cpu() -> None:
    """On a CPU backend, orbax writes each replicated array from one replica. Its default there
    (replica-parallel saving) cuts a replicated array into one slice per replica, every slice
    an eager op on the device: on a host's simulated devices, which share one memory and one
    disk, that is hundreds of ops per save of a one-layer model's train state (8 devices) and
    no faster write. orbax itself turns it off when JAX_PLATFORMS names a GPU; TPUs keep the
    parallel writes."""
    if jax.default_backend() != "cpu":
        return
    handler = ocp.type_handlers.get_type_handler(jax.Array)
    if getattr(handler, "_use_replica_parallel", False):  # once per process
        store = getattr(handler, "_array_metadata_store", None)  # keep orbax's own
        whole = ocp.type_handlers.ArrayHandler(
            use_replica_parallel=False, array_metadata_store=store
        )
        absl = logging.getLogger("absl")  # orbax warns of every override: this one is meant
        level = absl.level
        absl.setLevel(logging.ERROR)
        try:
            ocp.type_handlers.register_type_handler(jax.Array, whole, override=True)
        finally:
            absl.setLevel(level)


class CheckpointMismatch(JaxllmError):
    """A checkpoint that does not fit the model it is restored into."""


class Checkpointer:
    """`save(step, state, meta, data)`, `latest_step()`, `restore(step, target, data)`."""

    def __init__(
        self,
        directory: Path,
        keep: int = 2,
        async_save: bool = True,
        save_concurrent_gb: int = 96,
    ) -> None:
        """`save_concurrent_gb` caps the bytes orbax writes at once (its copies of the arrays
        in flight): 1 keeps a one-shot save of a large model (HF import) near 1x its size."""
        _whole_replica_writes_on_cpu()
        directory = storage_path(directory)
        self.directory = directory if is_remote(directory) else directory.absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        handlers = {
            "state": ocp.StandardCheckpointHandler(save_concurrent_gb=save_concurrent_gb),
            "meta": ocp.JsonCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any], data: Any = None) -> None:
        """Starts an async save (every process calls it); `meta` (JSON: config, model, ...)
        is process 0's, `data` — a grain iterator, or anything with a JSON `get_state` — is
        each process's own (its state is read now, before the call returns)."""
        state = _without_frozen(state)
        meta = portable_paths(meta, self.directory)
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_Snapshot(data.get_state()))
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def drop_from(self, step: int) -> None:
        """Deletes the saved steps >= `step`: what a killed run wrote past the checkpoint it
        resumes from, which its rerun writes again."""
        self.manager.wait_until_finished()
        for saved in self.manager.all_steps():
            if saved >= step:
                self.manager.delete(saved)

    def restore(self, step: int, target: Any, data: Any = None) -> tuple[Any, dict[str, Any]]:
        """Restores into `target` (a tree of `jax.ShapeDtypeStruct` with shardings) and, given
        `data` (an iterator with `set_state`), puts it back where this process's was."""
        target = _without_frozen(target)
        self.check_shapes(step, target)
        items = {"state": ocp.args.StandardRestore(target), "meta": ocp.args.JsonRestore()}
        slot = _Snapshot(None)
        if data is not None and self.check_data(step):
            items["data"] = grain.checkpoint.CheckpointRestore(slot)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        meta = resolve_paths(dict(out.meta), self.directory)
        if data is not None and "data" in items:
            data.set_state(slot.state)
        elif data is not None and "data_state" in meta:  # an older checkpoint: process 0's
            if jax.process_count() > 1:
                raise CheckpointMismatch(
                    f"{self.directory}/{step}: holds only process 0's data position (written "
                    "before per-process data state); resume it on one process"
                )
            data.set_state(meta["data_state"])
        return out.state, meta

    def check_data(self, step: int) -> bool:
        """Whether `step` holds per-process data state (older checkpoints do not); fails,
        naming both counts, when it was written by another number of processes."""
        folder = self.directory / str(step) / "data"
        if not folder.is_dir():
            return False
        counts = {int(m[1]) for f in folder.iterdir() if (m := _DATA_FILE.match(f.name))}
        if counts and counts != {jax.process_count()}:
            raise CheckpointMismatch(
                f"{self.directory}/{step}: data-iterator state saved by {min(counts)} "
                f"processes, this run has {jax.process_count()}; resume with {min(counts)}"
            )
        return True

    def restore_params(self, step: int, params: Any) -> tuple[Any, dict[str, Any]]:
        """Only the saved state's `params` subtree, into `params` (a tree of
        `jax.ShapeDtypeStruct` with shardings), and the metadata. The optimizer state, step
        and RNG are not read (orbax partial restore): a model loaded to use or to start
        from needs its weights alone, and Adam's moments are twice their size."""
        return self.restore_subtree(step, "params", params)

    def restore_subtree(self, step: int, name: str, target: Any) -> tuple[Any, dict[str, Any]]:
        """The saved state's `name` subtree (`params`, `opt_state`) into `target`, and the
        metadata (orbax partial restore: nothing else is read)."""
        item = {name: target}
        self.check_shapes(step, item)
        args = ocp.args.PyTreeRestore(
            item=item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True,
        )
        with ocp.PyTreeCheckpointer() as reader:
            out = reader.restore(self.directory / str(step) / "state", args=args)
        return out[name], self.read_meta(step)

    def read_meta(self, step: int) -> dict[str, Any]:
        """The metadata of `step` (`{}` if none), its `PATH_KEYS` resolved to usable paths."""
        path = self.directory / str(step) / "meta" / "metadata"
        meta = json.loads(path.read_text()) if path.is_file() else {}
        return resolve_paths(meta, self.directory)

    def saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
        """Dotted path → shape of every array saved at `step` (`params.embed.embedding`, ...),
        from orbax's metadata: which model wrote a checkpoint, without reading it."""
        saved = self.manager.item_metadata(step)["state"]
        return {key: tuple(leaf.shape) for key, leaf in _flat(saved)}

    def check_shapes(self, step: int, target: Any) -> None:
        saved = self.manager.item_metadata(step)["state"]
        want = dict(_flat(target))
        have = dict(_flat(saved))
        for key, w in want.items():
            h = have.get(key)
            if h is None:
                hint = " or with another model.scan_layers" if ".blocks." in f".{key}." else ""
                raise CheckpointMismatch(
                    f"{self.directory}/{step}: checkpoint has no parameter '{key}' "
                    f"(was it written by another model or stage{hint}?)"
                )
            if tuple(h.shape) != tuple(w.shape):
                raise CheckpointMismatch(
                    f"{self.directory}/{step}: parameter '{key}' has shape {tuple(h.shape)} in "
                    f"the checkpoint but {tuple(w.shape)} in the model; use the checkpoint's "
                    "model config"
                )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


_DATA_FILE = re.compile(r"process_\d+-of-(\d+)\.json$")


class _Snapshot:
    """A data-iterator state captured when a save starts (the loop moves on at once) and
    the slot a restore fills: what grain's checkpoint handler reads and writes, as bytes."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state, indent=1).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state)

    def start_prefetch(self) -> None:  # grain's handler calls it after a restore
        pass


def portable_paths(meta: dict[str, Any], directory: Path) -> dict[str, Any]:
    """`meta` with each `PATH_KEYS` value (a path from the cwd, or absolute) rewritten
    relative to `directory`, and its absolute form kept as `<key>_absolute` (a bucket
    directory keeps the absolute paths: local files are not relative to it)."""
    out = dict(meta)
    for key in PATH_KEYS:
        value = meta.get(key)
        if not value or is_remote(value):
            continue
        absolute = os.path.normpath(Path(value).absolute())
        if is_remote(directory):  # local files are not relative to a bucket
            out[key] = absolute
        else:
            out[key] = os.path.relpath(absolute, Path(directory).absolute())
            out[f"{key}_absolute"] = absolute
    return out


def resolve_paths(meta: dict[str, Any], directory: Path) -> dict[str, Any]:
    """`meta` with each `PATH_KEYS` value as a path to use: relative to `directory` if that
    exists, else the recorded absolute path, else (old checkpoints) the value from the cwd.
    When none exists, the path relative to `directory` (old: the value) is kept for the
    error message of whoever opens it."""
    out = dict(meta)
    if is_remote(directory):
        return out
    for key in PATH_KEYS:
        value, absolute = meta.get(key), meta.get(f"{key}_absolute")
        if not value:
            continue
        near = os.path.normpath(Path(directory).absolute() / value)
        found = [p for p in (near, absolute, value) if p and Path(p).exists()]
        out[key] = found[0] if found else (near if absolute else value)
    return out


def _without_frozen(state: Any) -> Any:
    return state.replace(frozen=None) if isinstance(state, TrainState) else state


def _flat(tree: Any) -> list[tuple[str, Any]]:
    """(dotted path, leaf) pairs; the path names parameters the way users see them."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_meta)[0]
    return [(_path_str(path), leaf) for path, leaf in leaves if hasattr(leaf, "shape")]


def _is_meta(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _path_str(path: tuple) -> str:
    parts = []
    for p in path:
        key = getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))
        if str(key) != "value":
            parts.append(str(key))
    return ".".join(parts)
