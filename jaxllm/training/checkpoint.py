"""orbax checkpoints of the whole run: train state, data-iterator state and metadata.

Saves are async and atomic (orbax writes to a temporary directory and renames it when the
save is complete), keeping the newest `keep` steps. A restore checks the saved shapes against
the model first, so a checkpoint of another model fails with a message naming the parameter.

A `TrainState`'s `frozen` part (LoRA's base weights, a stage's fixed parts) is never written:
it is rebuilt from the stage's inputs, so a LoRA checkpoint holds only the adapters (and their
optimizer state). `restore` returns the state with `frozen=None`; the caller puts it back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxllm.errors import JaxllmError
from jaxllm.training.state import TrainState


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
        return out.state, dict(out.meta)

    def read_meta(self, step: int) -> dict[str, Any]:
        path = self.directory / str(step) / "meta" / "metadata"
        return json.loads(path.read_text()) if path.is_file() else {}

    def check_shapes(self, step: int, target: Any) -> None:
        saved = self.manager.item_metadata(step)["state"]
        want = dict(_flat(target))
        have = dict(_flat(saved))
        for key, w in want.items():
            h = have.get(key)
            if h is None:
                raise CheckpointMismatch(
                    f"{self.directory}/{step}: checkpoint has no parameter '{key}' "
                    "(was it written by another model or stage?)"
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
