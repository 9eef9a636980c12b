"""Shared wiring for stages that train a decoder LM: model from config or checkpoint, the
jitted steps, and the loop (held-out figures: `held_out.py`). Pretraining is the plain case; later stages swap the
loss and the batches, never the loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import (
    Config,
    ModelConfig,
    PeftConfig,
    is_remote,
    replace,
    storage_path,
    to_dict,
)
from jaxllm.errors import ConfigError
from jaxllm.models import Decoder
from jaxllm.models.heads import HeadParam
from jaxllm.models.lora import apply_lora, has_lora, merge_lora
from jaxllm.sharding import validate_mesh
from jaxllm.trainers import require_input
from jaxllm.training.checkpoint import Checkpointer
from jaxllm.training.loop import LoopSpec
from jaxllm.training.losses import cross_entropy, head_cross_entropy
from jaxllm.training.state import (
    TrainState,
    count_params,
    create_train_state,
    state_shardings,
    to_global,
)


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


CPU_LOSS_CHUNK = 32


def resolve_loss_chunk(cfg: Config, backend: str | None = None) -> int:
    """`train.loss_chunk` as the step uses it: -1 (auto) is 32 on CPU when 32 divides the
    sequence length (the fused loss measured 1.02-1.11x the plain step there, never slower
    beyond noise) and off elsewhere until an accelerator has timed it; an explicit chunk must
    divide `loader.seq_len`."""
    chunk, length = cfg.train.loss_chunk, cfg.loader.seq_len
    if chunk == -1:
        on_cpu = (backend or jax.default_backend()) == "cpu"
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


def model_fn(m: ModelConfig, seed: int) -> Callable[[], Decoder]:
    return lambda: Decoder(m, rngs=nnx.Rngs(seed))


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
    saved position."""
    step = ckpt.latest_step()
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


Wrap = Callable[[nnx.Module, nnx.Rngs], nnx.Module]  # decoder → model with a stage's head


def trainable_filter(peft: PeftConfig):
    """What a stage trains: every weight, or under LoRA the adapters plus any new head."""
    return nnx.Any(nnx.LoRAParam, HeadParam) if peft.enabled else nnx.Param


def load_checkpoint_model(
    ckpt_dir: Path, mesh, rules: str = "dp", step: int | None = None, wrap: Wrap | None = None
) -> tuple[nnx.GraphDef, nnx.State, ModelConfig, dict[str, Any]]:
    """The model (graphdef + full state) of a jaxllm checkpoint directory.

    The model and optimizer configs come from the checkpoint's own metadata, so a later stage
    needs only the path. A LoRA checkpoint holds only adapters: its base is loaded from the
    `base_checkpoint` its metadata names (recursively, merged), and the adapters put on it
    (the returned state holds `nnx.LoRAParam`s; `merge_lora` folds them in). `wrap` rebuilds
    a stage's head around the decoder (reward/value checkpoints). Returns
    `(graphdef, state, model_cfg, meta)`.
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
    if run_cfg.peft.enabled:
        base = meta.get("base_checkpoint")
        if not base:
            raise ConfigError(f"{ckpt_dir}/{step}: LoRA checkpoint names no base_checkpoint")
        if not Path(base).is_dir():
            raise ConfigError(
                f"{ckpt_dir}/{step}: the LoRA base checkpoint {base} is gone; move or copy the "
                "base's run together with this one (base_checkpoint is kept relative to it)"
            )
        bg, bstate, _, _ = load_checkpoint_model(Path(base), mesh, rules)
        model = nnx.merge(bg, bstate)
        merge_lora(model)
        model = wrap(model, nnx.Rngs(0)) if wrap else model
        with nnx.use_eager_sharding(False):
            apply_lora(model, run_cfg.peft, nnx.Rngs(0))
        graphdef, params, frozen = nnx.split(model, trainable_filter(run_cfg.peft), ...)
        state, shardings = fresh_train_state(params, frozen, tx, mesh, rules, 0)
    else:
        build = model_fn(m, 0)
        fn = (lambda: wrap(build(), nnx.Rngs(0))) if wrap else build
        graphdef, state, shardings = create_train_state(fn, tx, mesh, rules, 0)
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
    restored, meta = ckpt.restore(step, target)
    ckpt.close()
    return graphdef, nnx.merge_state(restored.params, state.frozen), m, meta


def fresh_train_state(params: nnx.State, frozen: nnx.State, tx, mesh, rules: str, seed: int):
    """A `TrainState` of these variables with a fresh optimizer state, built in its
    shardings (the inputs may already be sharded). Returns `(state, shardings)`."""

    def init(params: nnx.State, frozen: nnx.State) -> TrainState:
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            frozen=frozen,
            opt_state=tx.init(params),
            rng=jax.random.key_data(jax.random.key(seed)),
        )

    shardings = state_shardings(jax.eval_shape(init, params, frozen), mesh, rules)
    return jax.jit(init, out_shardings=shardings)(params, frozen), shardings


@dataclass
class StartPoint:
    """A fine-tuning stage's starting train state and what it came from."""

    graphdef: nnx.GraphDef
    state: TrainState
    shardings: Any
    model: ModelConfig
    meta: dict[str, Any]  # the input checkpoint's metadata (config, tokenizer, ...)
    checkpoint: str  # the input checkpoint directory (a LoRA run's base)
    trainable_params: int
    total_params: int

    def checkpoint_meta(self, cfg: Config, tokenizer: str) -> dict[str, Any]:
        """What this stage's checkpoints carry so later stages can load them by path."""
        return {
            "config": to_dict(cfg),
            "model": to_dict(self.model),
            "tokenizer": str(tokenizer),
            "base_checkpoint": self.checkpoint,
        }


def init_from_checkpoint(cfg: Config, tx, mesh, wrap: Wrap | None = None) -> StartPoint:
    """The train state of a stage that starts from `inputs.checkpoint`: its weights (a LoRA
    input merged into plain weights), `wrap`'s head if given, adapters if `peft` asks, and a
    fresh optimizer state over what trains."""
    ckpt_in = str(Path(require_input(cfg, "checkpoint")).absolute())
    graphdef, weights, m, meta = load_checkpoint_model(Path(ckpt_in), mesh, cfg.mesh.rules)
    validate_mesh(replace(cfg, model=m), len(jax.devices()), m.vocab_size)
    if m.positions == "learned" and cfg.loader.seq_len > m.max_seq_len:
        raise ConfigError(
            f"config key 'loader.seq_len': {cfg.loader.seq_len} exceeds the checkpoint model's "
            f"max_seq_len ({m.max_seq_len}) of learned positions"
        )
    model = nnx.merge(graphdef, weights)
    merge_lora(model)
    rngs = nnx.Rngs(params=cfg.seed)
    model = wrap(model, rngs) if wrap else model
    if cfg.peft.enabled:
        try:
            with nnx.use_eager_sharding(False):
                apply_lora(model, cfg.peft, rngs)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    graphdef, params, frozen = nnx.split(model, trainable_filter(cfg.peft), ...)
    state, shardings = fresh_train_state(params, frozen, tx, mesh, cfg.mesh.rules, cfg.seed)
    trainable = count_params(state.params)
    return StartPoint(
        graphdef, state, shardings, m, meta, ckpt_in, trainable, trainable + count_params(frozen)
    )


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


def load_frozen_model(
    ckpt_dir: Path, mesh, rules: str = "dp", wrap: Wrap | None = None
) -> tuple[nnx.GraphDef, nnx.State, Any, ModelConfig, dict[str, Any]]:
    """A checkpoint's model as plain weights (LoRA merged) for a fixed role — a DPO/PPO
    reference, a distillation teacher, a reward model — to pass to a step as `consts`.
    Returns `(graphdef, state, shardings, model_cfg, meta)`."""
    graphdef, state, m, meta = load_checkpoint_model(Path(ckpt_dir), mesh, rules, wrap=wrap)
    if has_lora(state):
        model = nnx.merge(graphdef, state)
        merge_lora(model)
        graphdef, state = nnx.split(model)
    return graphdef, state, jax.tree.map(lambda x: x.sharding, state), m, meta


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
    return LoopSpec(
        step_fn=step_fn,
        batches=batches,
        to_device=lambda b: to_global(b, mesh, leading=1 if t.grad_accum > 1 else 0),
        total_steps=t.steps,
        log_every=t.log_every,
        eval_every=t.eval_every,
        checkpoint_every=t.checkpoint_every,
        eval_fn=eval_fn,
        tokens_per_step=tokens,
        meta=meta or {},
        progress=cfg.progress,
        desc=desc or f"{cfg.stage} {cfg.name}",
        **extra,
    )
