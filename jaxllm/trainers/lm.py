"""Shared wiring for stages that train a decoder LM: model from config or checkpoint, the
jitted steps, and the loop (held-out figures: `held_out.py`). Pretraining is the plain case;
later stages swap the loss and the batches, never the loop. Loading a checkpoint's model
(weights only) lives in `checkpoint_model.py`; its names are re-exported here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from jaxllm.config import (
    Config,
    ModelConfig,
    is_remote,
    replace,
    storage_path,
    to_dict,
)
from jaxllm.errors import ConfigError
from jaxllm.models.peft import apply_peft, merge_peft, peft_method
from jaxllm.models.quant import is_quantized
from jaxllm.models.target import target_platform
from jaxllm.sharding import validate_mesh
from jaxllm.trainers import require_input
from jaxllm.trainers.checkpoint_model import Wrap as Wrap
from jaxllm.trainers.checkpoint_model import (
    folded_final_save,
    peft_token_ids,
    quantize_loaded,
    restore_folded,
)
from jaxllm.trainers.checkpoint_model import fresh_train_state as fresh_train_state
from jaxllm.trainers.checkpoint_model import load_checkpoint_model as load_checkpoint_model
from jaxllm.trainers.checkpoint_model import load_frozen_model as load_frozen_model
from jaxllm.trainers.checkpoint_model import model_fn as model_fn
from jaxllm.trainers.checkpoint_model import quantize_state as quantize_state
from jaxllm.trainers.checkpoint_model import trainable_filter as trainable_filter
from jaxllm.training.checkpoint import Checkpointer
from jaxllm.training.loop import LoopSpec, Watch
from jaxllm.training.losses import cross_entropy, head_cross_entropy
from jaxllm.training.state import (
    TrainState,
    check_training_precision,
    count_params,
    to_global,
)


def resolve_model(cfg: Config, vocab_size: int, arch: str = "decoder") -> ModelConfig:
    """The model config with the tokenizer's vocabulary filled in, checked against the data,
    the stage's kind of model (`arch`) and the training precision rule
    (`check_training_precision`)."""
    m = cfg.model
    if m.arch != arch:
        raise ConfigError(
            f"config key 'model.arch': {m.arch} (preset {m.preset or 'none'}), but stage "
            f"{cfg.stage} trains an {arch}; pick an {arch} model"
            + (" (e.g. preset: bert_tiny)" if arch == "encoder" else " (e.g. preset: tiny)")
        )
    if m.vocab_size and m.vocab_size < vocab_size:
        raise ConfigError(
            f"config key 'model.vocab_size': {m.vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({vocab_size}); set it to 0 to use the tokenizer's"
        )
    m = replace(m, vocab_size=m.vocab_size or vocab_size)
    check_training_precision(m)
    if m.positions == "learned" and cfg.loader.seq_len > m.max_seq_len:
        raise ConfigError(
            f"config key 'loader.seq_len': {cfg.loader.seq_len} exceeds model.max_seq_len "
            f"({m.max_seq_len}) of learned positions"
        )
    validate_mesh(replace(cfg, model=m), len(jax.devices()), m.vocab_size)
    return m


CPU_LOSS_CHUNK = 32


def resolve_loss_chunk(cfg: Config, backend: str | None = None) -> int:
    """`train.loss_chunk` as the step uses it: -1 (auto) is 32 on CPU when 32 divides the
    sequence length (the fused loss measured 1.02-1.11x the plain step there, never slower
    beyond noise) and off elsewhere until an accelerator has timed it; an explicit chunk must
    divide `loader.seq_len`."""
    chunk, length = cfg.train.loss_chunk, cfg.loader.seq_len
    if chunk == -1:
        on_cpu = (backend or target_platform()) == "cpu"
        return CPU_LOSS_CHUNK if on_cpu and length % CPU_LOSS_CHUNK == 0 else 0
    if chunk > 0 and length % chunk:
        raise ConfigError(
            f"config key 'train.loss_chunk': {chunk} does not divide loader.seq_len {length}; "
            "pick a divisor, 0 (off) or -1 (auto)"
        )
    return chunk


def kernel_choices(cfg: Config, m: ModelConfig) -> dict[str, Any]:
    """The kernels a decoder stage runs, for its summary.json."""
    from jaxllm.models.kernels import resolve_attention

    return {"attention": resolve_attention(m), "loss_chunk": resolve_loss_chunk(cfg)}


def lm_loss(z_loss: float = 0.0, loss_chunk: int = 0):
    """Next-token cross-entropy on packed batches (tokens/targets/segment_ids/positions).
    `loss_chunk > 0` fuses the output layer into the loss, that many positions at a time
    (`head_cross_entropy`: same sums and gradients, no [B, L, V] logits in memory)."""

    def loss_fn(model, batch, key):
        kw = dict(
            positions_BL=batch["positions"],
            segment_ids_BL=batch.get("segment_ids"),  # absent: one sequence per row
            deterministic=key is None,
            key=key,
        )
        w_VD = model.output_weight() if loss_chunk else None
        if w_VD is not None:
            x_BLD = model.features(batch["tokens"], **kw)
            return head_cross_entropy(
                x_BLD, w_VD, batch["targets"], batch["loss_mask"], z_loss, loss_chunk
            )
        logits = model(batch["tokens"], **kw)
        return cross_entropy(logits, batch["targets"], batch["loss_mask"], z_loss)

    return loss_fn


def restore_latest(
    ckpt: Checkpointer, state: TrainState, shardings: Any, data_iter: Any = None
) -> tuple[TrainState, int, dict[str, Any]] | None:
    """The newest checkpoint in `ckpt` restored into `state`'s shapes and shardings (its
    `frozen` part, never saved, taken from `state`), with its step and metadata; None if the
    directory holds none. `data_iter` (with `set_state`) is put back at this process's
    saved position.

    A reparameterised PEFT run's last checkpoint (its last step or an early stop) holds only
    the folded prefixes/prompts: no MLP, no optimizer state. Found without the run's summary
    (the run was killed after saving it), it is dropped and the run goes back to the newest
    checkpoint before it, or to its start, and repeats the steps after that: the same steps
    give the same folded values."""
    step = ckpt.latest_step()
    while step is not None and ckpt.read_meta(step).get("peft_folded"):
        ckpt.drop_from(step)
        back = ckpt.latest_step()
        print(
            f"{ckpt.directory}/{step}: the run stopped after saving its folded PEFT "
            "prefixes/prompts, which cannot be trained on; repeating the steps after "
            f"{back or 0} to finish it"
        )
        step = back
    if step is None:
        return None
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
    data = data_iter if hasattr(data_iter, "set_state") else None
    restored, meta = ckpt.restore(step, target, data=data)
    print(f"resumed from {ckpt.directory}/{step}")
    return restored.replace(frozen=state.frozen), step, meta


def restore_or_init(
    ckpt: Checkpointer, state: TrainState, shardings: Any, data_iter: Any
) -> tuple[TrainState, int]:
    """Resumes from the newest checkpoint in `ckpt` (state + this process's data position),
    if there is one."""
    found = restore_latest(ckpt, state, shardings, data_iter)
    if found is None:
        return state, 0
    restored, step, _ = found
    return restored, step


def checkpoint_dir(run_dir: Path) -> Path:
    return storage_path(run_dir) / "checkpoints"


def best_dir(run_dir: Path) -> Path:
    return storage_path(run_dir) / "best"


def output_checkpoint(cfg: Config, run_dir: Path) -> str:
    """The checkpoint a stage hands on: the best evaluation's with `train.keep_best`."""
    return str(best_dir(run_dir) if cfg.train.keep_best else checkpoint_dir(run_dir))


def make_watch(cfg: Config) -> Watch | None:
    """The loop's early-stopping / best-checkpoint tracker, when the config asks for one."""
    es, t = cfg.train.early_stopping, cfg.train
    if not (es.patience or t.keep_best):
        return None
    if not t.eval_every:
        raise ConfigError(
            "config key 'train.eval_every': early stopping and keep_best judge evaluations; "
            "set eval_every > 0"
        )
    best = Checkpointer(best_dir(cfg.run_dir), 1, False) if t.keep_best else None
    return Watch(es.metric, es.mode, es.patience, es.min_delta, best=best)


def best_state(cfg, run_dir: Path, start, state, mesh):
    """`(state, model)`: with `train.keep_best`, the best evaluation's state (what the stage
    hands on), else `state`; `model` is None, or for a reparameterised PEFT run, whose
    best/ holds the folded prefixes/prompts, the folded model's `(graphdef, shardings)`.
    Every stage's figures after training are of this state: the checkpoint it hands on."""
    if not cfg.train.keep_best:
        return state, None
    best = Checkpointer(best_dir(run_dir), async_save=False)
    try:
        step = best.latest_step()
        if step is not None and best.read_meta(step).get("peft_folded"):
            graphdef, folded, shardings = restore_folded(
                best, step, start.graphdef, state, trainable_filter(cfg.peft), mesh,
                cfg.mesh.rules,
            )  # fmt: skip
            return folded, (graphdef, shardings)
        found = restore_latest(best, state, start.shardings)
        return (state if found is None else found[0]), None
    finally:
        best.close()


def best_figures(last: dict[str, Any]) -> dict[str, Any]:
    """The early-stopping figures a loop returned, for a stage's summary."""
    keys = ("best_step", "best_value", "stopped_early_at")
    return {k: last[k] for k in keys if k in last}


@dataclass
class StartPoint:
    """A fine-tuning stage's starting train state and what it came from."""

    graphdef: nnx.GraphDef
    state: TrainState
    shardings: Any
    model: ModelConfig
    meta: dict[str, Any]  # the input checkpoint's metadata (config, tokenizer, ...)
    checkpoint: str  # the input checkpoint directory (a PEFT run's base)
    trainable_params: int
    total_params: int
    # what the last step saves instead of the train state (PEFT reparameterisations folded)
    final_save: Any = None

    def checkpoint_meta(self, cfg: Config, tokenizer: str) -> dict[str, Any]:
        """What this stage's checkpoints carry so later stages can load them by path."""
        return {
            "config": to_dict(cfg),
            "model": to_dict(self.model),
            "tokenizer": str(tokenizer),
            "base_checkpoint": self.checkpoint,
        }


def check_checkpoint_model(cfg: Config, m: ModelConfig, n_devices: int | None = None) -> None:
    """A stage that trains a checkpoint's model `m`: its mesh and sequence length must fit."""
    validate_mesh(replace(cfg, model=m), n_devices or len(jax.devices()), m.vocab_size)
    if m.positions == "learned" and cfg.loader.seq_len > m.max_seq_len:
        raise ConfigError(
            f"config key 'loader.seq_len': {cfg.loader.seq_len} exceeds the checkpoint model's "
            f"max_seq_len ({m.max_seq_len}) of learned positions"
        )


def init_from_checkpoint(cfg: Config, tx, mesh, wrap: Wrap | None = None) -> StartPoint:
    """The train state of a stage that starts from `inputs.checkpoint`: its weights (a LoRA
    input merged into plain weights), `wrap`'s head if given (a reward stage started from a
    reward checkpoint keeps that checkpoint's trained head), the `peft` method if one is
    asked for (models/peft), and a fresh optimizer state over what trains."""
    ckpt_in = str(Path(require_input(cfg, "checkpoint")).absolute())
    # a reward model trained on: its head comes along (more preferences, as in iterated RLHF)
    headed = wrap is not None and cfg.stage == "reward" == written_by(Path(ckpt_in))
    graphdef, weights, m, meta = load_checkpoint_model(
        Path(ckpt_in), mesh, cfg.mesh.rules, wrap=wrap if headed else None
    )
    check_checkpoint_model(cfg, m)
    model = nnx.merge(graphdef, weights)
    try:
        left = merge_peft(model)
    except ValueError as e:  # a QLoRA checkpoint: its adapters cannot fold into int weights
        raise ConfigError(f"config key 'inputs.checkpoint': {ckpt_in}: {e}") from None
    model = _qlora_base(cfg, model, mesh)
    if left:
        raise ConfigError(
            f"config key 'inputs.checkpoint': {ckpt_in} was trained with peft.method "
            f"{left[0]}, which cannot be merged into plain weights to train on; start from "
            "its base checkpoint, or train the earlier run with lora"
        )
    rngs = nnx.Rngs(params=cfg.seed)
    model = wrap(model, rngs) if wrap and not headed else model
    return start_from_model(cfg, model, m, meta, ckpt_in, tx, mesh, rngs)


def written_by(ckpt_dir: Path) -> str:
    """The stage that wrote a checkpoint directory's latest checkpoint ("" if none is there)."""
    ckpt = Checkpointer(ckpt_dir, async_save=False)
    step = ckpt.latest_step()
    stage = "" if step is None else ckpt.read_meta(step).get("config", {}).get("stage", "")
    ckpt.close()
    return stage


def start_from_model(
    cfg: Config, model: nnx.Module, m: ModelConfig, meta: dict[str, Any], ckpt_in: str, tx,
    mesh, rngs: nnx.Rngs,
) -> StartPoint:  # fmt: skip
    """The `StartPoint` of a built model (weights loaded, a stage's head on): adapters if
    `peft` asks, and a fresh optimizer state over what trains."""
    if cfg.peft.enabled:
        try:
            ids = peft_token_ids(cfg.peft, cfg.inputs.tokenizer or meta.get("tokenizer", ""))
            with nnx.use_eager_sharding(False):
                apply_peft(model, cfg.peft, rngs, ids)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    filt = trainable_filter(cfg.peft)
    graphdef, params, frozen = nnx.split(model, filt, ...)
    state, shardings = fresh_train_state(params, frozen, tx, mesh, cfg.mesh.rules, cfg.seed)
    trainable = count_params(state.params)
    if not cfg.peft.enabled:  # every weight trains, as float32 master weights: say so
        m = replace(m, param_dtype="float32")
    reparameterised = cfg.peft.enabled and peft_method(cfg.peft.method).reparameterised(cfg.peft)
    final = folded_final_save(graphdef, filt) if reparameterised else None
    return StartPoint(
        graphdef, state, shardings, m, meta, ckpt_in, trainable,
        trainable + count_params(frozen), final,
    )  # fmt: skip


def _qlora_base(cfg: Config, model: nnx.Module, mesh) -> nnx.Module:
    """The frozen base of QLoRA: `quantize:` applied to the loaded model (a checkpoint
    already quantised stays so). Int weights never train: without a PEFT method a
    quantised base is refused."""
    if not (cfg.quantize.enabled or is_quantized(model)):
        return model
    if not cfg.peft.enabled:
        if is_quantized(model):  # the checkpoint itself: quantize.method cannot undo it
            why = (f"inputs.checkpoint {cfg.inputs.checkpoint} is quantised (stage: quantize); "
                   "train its float source instead")  # fmt: skip
        else:
            why = f"quantize.method {cfg.quantize.method} makes it so; or set quantize.method: none"
        raise ConfigError(
            "config key 'peft.method': a quantised base has int weights that cannot train: set "
            f"peft.method: lora (QLoRA), or {why}"
        )
    return quantize_loaded(model, cfg.quantize, mesh, cfg.mesh.rules)


def load_model_tokenizer(path: str | Path, m: ModelConfig) -> Any:
    """The tokenizer named by `inputs.tokenizer` or the checkpoint (sentencepiece or an
    imported `tokenizer.json`), checked against the model's vocabulary."""
    from jaxllm.interop import load_tokenizer  # local: interop is only needed here

    if not path:
        raise ConfigError("config key 'inputs.tokenizer' is empty and the checkpoint names none")
    tok = load_tokenizer(Path(path))
    if tok.vocab_size > m.vocab_size:
        raise ConfigError(
            f"config key 'inputs.tokenizer': {path} has {tok.vocab_size} tokens but the "
            f"checkpoint's model has vocab_size {m.vocab_size}; use the pretraining tokenizer"
        )
    return tok


def stage_tokenizer(cfg: Config, meta: dict[str, Any], m: ModelConfig) -> tuple[Any, str]:
    """`(tok, path)`: the tokenizer a stage trains with (`inputs.tokenizer`, else the input
    checkpoint's), checked against the model and kept in the run directory."""
    tok = load_model_tokenizer(cfg.inputs.tokenizer or meta.get("tokenizer", ""), m)
    return tok, keep_tokenizer(tok, cfg.run_dir)


def keep_tokenizer(tok: Any, run_dir: Path) -> str:
    """Saves the stage's tokenizer into its run directory (`tokenizer.model`, or `tokenizer/`
    with the `tokenizer.json` files) and returns that path for the checkpoints to record, so
    the run loads from anywhere once moved; a tokenizer already inside the run stays put.
    Process 0 writes; a run in a bucket records the tokenizer where it is (tokenizers load
    from local files)."""
    from jaxllm.tokenizer import Tokenizer

    if is_remote(run_dir):
        return str(Path(tok.path).absolute())
    run = Path(run_dir).absolute()
    if tok.path is not None and Path(tok.path).absolute().is_relative_to(run):
        return str(tok.path)
    sp = isinstance(tok, Tokenizer)
    if jax.process_index() == 0:
        saved = tok.save(run) if sp else tok.save(run / "tokenizer").parent
        return str(saved)
    return str(run / "tokenizer.model") if sp else str(run / "tokenizer")


def param_figures(start: StartPoint, run_dir: Path) -> dict[str, Any]:
    """Trainable / total parameters and the size on disk of the newest checkpoint."""
    out: dict[str, Any] = {
        "trainable_params": start.trainable_params,
        "total_params": start.total_params,
        "trainable_share": round(start.trainable_params / max(start.total_params, 1), 6),
    }
    ckpts = checkpoint_dir(run_dir)
    steps = [p for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.is_dir() else []
    if steps and not is_remote(ckpts):  # sizes of bucket objects: left to the bucket's tools
        newest = max(steps, key=lambda p: int(p.name))
        out["checkpoint_bytes"] = sum(f.stat().st_size for f in newest.rglob("*") if f.is_file())
    return out


def loop_spec(
    cfg: Config,
    step_fn,
    batches,
    mesh,
    eval_fn,
    meta: dict[str, Any] | None = None,
    rows_per_example: int = 1,
    desc: str = "",
    **extra: Any,
) -> LoopSpec:
    """The loop spec every stage that runs `run_loop` builds (pretrain, sft, distill, reward,
    dpo): the config's steps and intervals, micro-batches stacked under `grad_accum`,
    tokens/s counted over `rows_per_example` sequences per example (2 for chosen/rejected
    pairs). `extra` goes to `LoopSpec` as it is (e.g. `flops_per_step`, `peak_flops`)."""
    t = cfg.train
    tokens = cfg.loader.batch_size * rows_per_example * cfg.loader.seq_len * t.grad_accum
    extra.setdefault("watch", make_watch(cfg))
    return LoopSpec(
        step_fn=step_fn,
        batches=batches,
        to_device=lambda b: to_global(b, mesh, leading=1 if t.grad_accum > 1 else 0),
        total_steps=t.steps,
        log_every=t.log_every,
        eval_every=t.eval_every,
        checkpoint_every=t.checkpoint_every,
        checkpoint_at=t.checkpoint_at,
        eval_fn=eval_fn,
        tokens_per_step=tokens,
        meta=meta or {},
        progress=cfg.progress,
        desc=desc or f"{cfg.stage} {cfg.name}",
        **extra,
    )
