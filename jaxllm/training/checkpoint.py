"""orbax checkpoints of the whole run: train state, data-iterator state and metadata.

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
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxllm.errors import JaxllmError
from jaxllm.training.state import TrainState

PATH_KEYS = ("tokenizer", "base_checkpoint")  # metadata values that are file paths


class CheckpointMismatch(JaxllmError):
    """A checkpoint that does not fit the model it is restored into."""


class Checkpointer:
    """`save(step, state, data_state, meta)`, `latest_step()`, `restore(step, target)`."""

    def __init__(
        self,
        directory: Path,
        keep: int = 2,
        async_save: bool = True,
        save_concurrent_gb: int = 96,
    ) -> None:
        """`save_concurrent_gb` caps the bytes orbax writes at once (its copies of the arrays
        in flight): 1 keeps a one-shot save of a large model (HF import) near 1x its size."""
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        handlers = {
            "state": ocp.StandardCheckpointHandler(save_concurrent_gb=save_concurrent_gb),
            "meta": ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Starts an async save; `meta` (JSON) carries the data-iterator state and config."""
        state = _without_frozen(state)
        meta = portable_paths(meta, self.directory)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
        """Restores into `target` (a tree of `jax.ShapeDtypeStruct` with shardings)."""
        target = _without_frozen(target)
        self.check_shapes(step, target)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
        )
        out = self.manager.restore(step, args=args)
        return out.state, resolve_paths(dict(out.meta), self.directory)

    def restore_params(self, step: int, params: Any) -> tuple[Any, dict[str, Any]]:
        """Only the saved state's `params` subtree, into `params` (a tree of
        `jax.ShapeDtypeStruct` with shardings), and the metadata. The optimizer state, step
        and RNG are not read (orbax partial restore): a model loaded to use or to start
        from needs its weights alone, and Adam's moments are twice their size."""
        target = {"params": params}
        self.check_shapes(step, target)
        args = ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        )
        with ocp.PyTreeCheckpointer() as reader:
            out = reader.restore(self.directory / str(step) / "state", args=args)
        return out["params"], self.read_meta(step)

    def read_meta(self, step: int) -> dict[str, Any]:
        """The metadata of `step` (`{}` if none), its `PATH_KEYS` resolved to usable paths."""
        path = self.directory / str(step) / "meta" / "metadata"
        meta = json.loads(path.read_text()) if path.is_file() else {}
        return resolve_paths(meta, self.directory)

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


def portable_paths(meta: dict[str, Any], directory: Path) -> dict[str, Any]:
    """`meta` with each `PATH_KEYS` value (a path from the cwd, or absolute) rewritten
    relative to `directory`, and its absolute form kept as `<key>_absolute`."""
    out = dict(meta)
    for key in PATH_KEYS:
        if meta.get(key):
            absolute = os.path.normpath(Path(meta[key]).absolute())
            out[key] = os.path.relpath(absolute, Path(directory).absolute())
            out[f"{key}_absolute"] = absolute
    return out


def resolve_paths(meta: dict[str, Any], directory: Path) -> dict[str, Any]:
    """`meta` with each `PATH_KEYS` value as a path to use: relative to `directory` if that
    exists, else the recorded absolute path, else (old checkpoints) the value from the cwd.
    When none exists, the path relative to `directory` (old: the value) is kept for the
    error message of whoever opens it."""
    out = dict(meta)
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
