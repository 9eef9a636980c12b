"""Shared wiring for stages that train a decoder LM: model from config or checkpoint, the
jitted steps, evaluation, and the loop. Pretraining is the plain case; later stages swap the
loss and the batches, never the loop."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxllm.config import Config, ModelConfig, replace
from jaxllm.errors import ConfigError
from jaxllm.models import Decoder
from jaxllm.sharding import validate_mesh
from jaxllm.training.checkpoint import Checkpointer
from jaxllm.training.losses import cross_entropy
from jaxllm.training.state import TrainState, create_train_state, to_global


def resolve_model(cfg: Config, vocab_size: int) -> ModelConfig:
    """The model config with the tokenizer's vocabulary filled in, checked against the data."""
    m = cfg.model
    if m.vocab_size and m.vocab_size < vocab_size:
        raise ConfigError(
            f"config key 'model.vocab_size': {m.vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({vocab_size}); set it to 0 to use the tokenizer's"
        )
    m = replace(m, vocab_size=m.vocab_size or vocab_size)
    if m.positions == "learned" and cfg.loader.seq_len > m.max_seq_len:
        raise ConfigError(
            f"config key 'loader.seq_len': {cfg.loader.seq_len} exceeds model.max_seq_len "
            f"({m.max_seq_len}) of learned positions"
        )
    validate_mesh(replace(cfg, model=m), len(jax.devices()), m.vocab_size)
    return m


def model_fn(m: ModelConfig, seed: int) -> Callable[[], Decoder]:
    return lambda: Decoder(m, rngs=nnx.Rngs(seed))


def lm_loss(z_loss: float = 0.0):
    """Next-token cross-entropy on packed batches (tokens/targets/segment_ids/positions)."""

    def loss_fn(model, batch, key):
        logits = model(
            batch["tokens"],
            positions_BL=batch["positions"],
            segment_ids_BL=batch["segment_ids"],
            deterministic=key is None,
            key=key,
        )
        return cross_entropy(logits, batch["targets"], batch["loss_mask"], z_loss)

    return loss_fn


def make_evaluator(
    eval_step: Callable, batches: Callable[[], Iterable[dict]], mesh, max_batches: int = 0
) -> Callable[[TrainState], dict[str, float]]:
    """Loss / perplexity / accuracy over the validation batches, summed exactly then divided."""

    def evaluate(state: TrainState) -> dict[str, float]:
        totals: dict[str, float] = {}
        for i, batch in enumerate(batches()):
            if max_batches and i >= max_batches:
                break
            out = jax.device_get(eval_step(state, to_global(batch, mesh)))
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        w = max(totals.get("weight", 0.0), 1.0)
        loss = totals.get("ce", totals.get("loss", 0.0)) / w
        return {
            "loss": loss,
            "ppl": math.exp(min(loss, 50.0)),
            "accuracy": totals.get("correct", 0.0) / w,
            "tokens": totals.get("weight", 0.0),
        }

    return evaluate


def restore_or_init(
    ckpt: Checkpointer, state: TrainState, shardings: Any, data_iter: Any
) -> tuple[TrainState, int]:
    """Resumes from the newest checkpoint in `ckpt` (state + data position), if there is one."""
    step = ckpt.latest_step()
    if step is None:
        return state, 0
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
    restored, meta = ckpt.restore(step, target)
    if "data_state" in meta and hasattr(data_iter, "set_state"):
        data_iter.set_state(meta["data_state"])
    print(f"resumed from {ckpt.directory}/{step}")
    return restored, step


def unigram_cross_entropy(
    train_ids: Iterable[list[int]], val_ids: Iterable[list[int]], vocab_size: int
) -> float:
    """Validation loss of an add-one-smoothed unigram model fitted on the train tokens.

    Scored on the same positions the LM is scored on (every token but a document's first), so
    the two losses compare directly.
    """
    counts = np.ones(vocab_size, np.float64)
    for ids in train_ids:
        counts += np.bincount(np.asarray(ids, np.int64), minlength=vocab_size)[:vocab_size]
    logp = np.log(counts / counts.sum())
    total, n = 0.0, 0
    for ids in val_ids:
        ids = np.asarray(ids[1:], np.int64)
        total -= float(logp[ids].sum())
        n += ids.size
    return total / max(n, 1)


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def load_checkpoint_model(
    ckpt_dir: Path, mesh, rules: str = "dp", step: int | None = None
) -> tuple[nnx.GraphDef, nnx.State, ModelConfig, dict[str, Any]]:
    """The model (graphdef + full state) of a pretrain-style checkpoint directory.

    The model and optimizer configs come from the checkpoint's own metadata, so a later stage
    needs only the path. Returns `(graphdef, state, model_cfg, meta)`.
    """
    from jaxllm.config import from_dict  # local: avoids a cycle at import time
    from jaxllm.training.optim import make_optimizer

    ckpt = Checkpointer(Path(ckpt_dir), async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise ConfigError(f"config key 'inputs.checkpoint': no checkpoint in {ckpt_dir}")
    meta = ckpt.read_meta(step)
    if "model" not in meta or "config" not in meta:
        raise ConfigError(f"{ckpt_dir}/{step}: not a jaxllm model checkpoint (no model metadata)")
    run_cfg = from_dict(meta["config"])
    m = from_dict({"stage": "generate", "model": meta["model"]}).model
    tx = make_optimizer(run_cfg.train.optim, run_cfg.train.steps)
    graphdef, state, shardings = create_train_state(model_fn(m, 0), tx, mesh, rules, 0)
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
    restored, meta = ckpt.restore(step, target)
    ckpt.close()
    return graphdef, nnx.merge_state(restored.params, restored.frozen), m, meta
