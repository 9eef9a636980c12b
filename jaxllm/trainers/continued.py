"""Continued (domain) pretraining: `stage: pretrain` starting from `inputs.checkpoint`.

The model's shape comes from the checkpoint and must equal the config's `model:` (a differing
key is an error naming it, never ignored); its runtime knobs (dtype, remat, dropout, attention
kernel) are the config's. The weights are the checkpoint's (a LoRA checkpoint's adapters
merged; an adapter, prefix or prompt checkpoint is refused: it cannot become plain weights),
as float32 master weights; the optimizer starts fresh (`train.init_optimizer: fresh`, the
usual choice with a new learning-rate schedule) or from the checkpoint's Adam moments
(`checkpoint`). The step counter, and so the schedule, starts at 0 either way.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import optax
from flax import nnx

from jaxllm.config import Config, ModelConfig, from_dict, replace
from jaxllm.errors import ConfigError
from jaxllm.models.peft import merge_peft, peft_method
from jaxllm.models.quant import is_quantized
from jaxllm.trainers.checkpoint_model import check_arch, load_checkpoint_model
from jaxllm.training.checkpoint import Checkpointer, CheckpointMismatch
from jaxllm.training.state import TrainState

# keys that set how the model runs, not what it is: the config's win
RUNTIME = {"preset", "dtype", "param_dtype", "remat", "dropout", "attention",
           "attention_max_docs", "init_std", "scan_layers"}  # fmt: skip


def checkpoint_model_config(path: str | Path) -> ModelConfig:
    """The model config a jaxllm checkpoint directory was trained with (its latest step)."""
    ckpt = Checkpointer(Path(path), async_save=False)
    step = ckpt.latest_step()
    if step is None:
        raise ConfigError(f"config key 'inputs.checkpoint': no checkpoint in {path}")
    meta = ckpt.read_meta(step)
    ckpt.close()
    if "model" not in meta:
        raise ConfigError(f"{path}/{step}: not a jaxllm model checkpoint (no model metadata)")
    m = from_dict({"stage": "generate", "model": meta["model"]}).model
    stage = meta.get("config", {}).get("stage", "?")
    check_arch(m, "decoder", f"{Path(path).absolute()}/{step}", stage)  # before the shape keys
    method = meta.get("config", {}).get("peft", {}).get("method", "none")
    if method != "none" and not peft_method(method).mergeable:
        _unmergeable(path, method)
    return m


def checkpoint_tokenizer(path: str | Path) -> str:
    """The tokenizer a checkpoint names (its latest step's metadata)."""
    ckpt = Checkpointer(Path(path), async_save=False)
    tok = ckpt.read_meta(ckpt.latest_step()).get("tokenizer", "")
    ckpt.close()
    return tok


def continued_model(cfg: Config, ckpt_m: ModelConfig) -> ModelConfig:
    """The config's model with the checkpoint's shape: every shape key must agree (the
    vocabulary may be left 0 = the checkpoint's)."""
    m = cfg.model if cfg.model.vocab_size else replace(cfg.model, vocab_size=ckpt_m.vocab_size)
    for f in dataclasses.fields(ModelConfig):
        if f.name in RUNTIME:
            continue
        ours, theirs = getattr(m, f.name), getattr(ckpt_m, f.name)
        if ours != theirs:
            raise ConfigError(
                f"config key 'model.{f.name}': {ours!r} here but {theirs!r} in "
                f"inputs.checkpoint; continued pretraining keeps the checkpoint's model "
                "(set model: to match it)"
            )
    return m


def load_into(state: TrainState, shardings: Any, cfg: Config, mesh) -> TrainState:
    """`state` with the checkpoint's weights (and, with `train.init_optimizer: checkpoint`,
    its optimizer moments), placed in `shardings`."""
    path = Path(cfg.inputs.checkpoint)
    graphdef, weights, _, meta = load_checkpoint_model(path, mesh, cfg.mesh.rules)
    if is_quantized(weights):
        raise ConfigError(
            f"config key 'inputs.checkpoint': {path} holds quantised int weights (stage "
            "quantize, or a QLoRA base), which pretraining cannot update; continue from the "
            "float checkpoint it was made from"
        )
    model = nnx.merge(graphdef, weights)
    left = merge_peft(model)
    if left:
        _unmergeable(path, left[0])
    params = nnx.split(model, nnx.Param, ...)[1]
    try:
        params = jax.tree.map(lambda new, old: new.astype(old.dtype), params, state.params)
    except ValueError:
        raise ConfigError(
            f"config key 'inputs.checkpoint': {path} holds another parameter layout (was it "
            "trained with another model.scan_layers?)"
        ) from None
    state = state.replace(params=jax.device_put(params, shardings.params))
    if cfg.train.init_optimizer == "checkpoint":
        state = state.replace(opt_state=_optimizer(path, meta, state, shardings))
    return state


def _unmergeable(path: str | Path, method: str) -> None:
    raise ConfigError(
        f"config key 'inputs.checkpoint': {path} was trained with peft.method {method}, which "
        "cannot be merged into plain weights to continue pretraining; start from its base "
        "checkpoint, or train that run with lora"
    )


def _optimizer(path: Path, meta: dict, state: TrainState, shardings: Any) -> Any:
    if from_dict(meta["config"]).peft.enabled:
        raise ConfigError(
            "config key 'train.init_optimizer': a PEFT checkpoint's optimizer moments are its "
            "adapters'; continue from it with init_optimizer: fresh"
        )
    ckpt = Checkpointer(path, async_save=False)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        state.opt_state, shardings.opt_state,
    )  # fmt: skip
    try:
        opt_state, _ = ckpt.restore_subtree(ckpt.latest_step(), "opt_state", target)
    except CheckpointMismatch as e:
        raise ConfigError(f"config key 'train.init_optimizer': {e}") from None
    finally:
        ckpt.close()
    # the moments and Adam's bias-correction count come along; the schedule starts at 0
    is_sched = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    return jax.tree.map(
        lambda x: x._replace(count=x.count * 0) if is_sched(x) else x, opt_state, is_leaf=is_sched
    )
