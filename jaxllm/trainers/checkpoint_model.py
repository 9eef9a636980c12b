"""A stage's model from a jaxllm checkpoint directory: its weights only.

A checkpoint holds the whole train state (weights, Adam's moments, step, RNG). A stage that
loads a model to use or to start from — a DPO/PPO reference, a distillation teacher, a reward
model, generation, export, a fine-tuning start — needs the weights alone, so only the
`params` subtree is read (`Checkpointer.restore_params`, an orbax partial restore) and the
model is built abstractly (`nnx.eval_shape`) as its target: no optimizer state is ever
allocated or read (Adam's is twice the weights).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig, PeftConfig, QuantizeConfig, is_remote, storage_path
from jaxllm.errors import ConfigError
from jaxllm.models import Decoder
from jaxllm.models.encoder import Encoder
from jaxllm.models.heads import HeadParam
from jaxllm.models.layers import QUANT_SCALE, ParamKeys
from jaxllm.models.peft import (
    apply_peft,
    fold_reparameterisations,
    merge_peft,
    methods_in,
    peft_method,
)
from jaxllm.models.quant import QuantWeight, is_quantized, quantize_model
from jaxllm.sharding.mesh import check_model_mesh
from jaxllm.training.checkpoint import Checkpointer
from jaxllm.training.state import TrainState, master_weights, state_shardings

Wrap = Callable[[nnx.Module, nnx.Rngs], nnx.Module]  # decoder → model with a stage's head


def model_fn(m: ModelConfig, seed: int) -> Callable[[], nnx.Module]:
    """Builds the model of `m`: a `Decoder`, or an `Encoder` for `model.arch: encoder`."""
    cls = Encoder if m.arch == "encoder" else Decoder
    return lambda: cls(m, rngs=ParamKeys(seed))


def trainable_filter(peft: PeftConfig):
    """What a stage trains: every weight, or under PEFT the method's variables (its own type,
    models/peft) plus any new head."""
    if not peft.enabled:
        return nnx.Param
    return nnx.Any(peft_method(peft.method).variable, HeadParam)


def restore_params(ckpt: Checkpointer, step: int, params: nnx.State, mesh, rules: str):
    """`(params, meta)`: the checkpoint's weights in the shapes, dtypes and shardings of
    `params` (abstract or concrete), and its metadata; nothing else of the state is read."""
    shardings = state_shardings(params, mesh, rules)
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings
    )
    return ckpt.restore_params(step, target)


def _materialised_rest(fn: Callable[[], nnx.Module], filt: Any, mesh, rules: str) -> nnx.State:
    """The model's non-trained variables (buffers; usually none) built in their shardings;
    XLA drops the weights' random init, which is never returned."""

    def rest() -> nnx.State:
        return nnx.split(fn(), filt, ...)[2]

    return jax.jit(rest, out_shardings=state_shardings(jax.eval_shape(rest), mesh, rules))()


def load_checkpoint_model(
    ckpt_dir: Path,
    mesh,
    rules: str = "dp",
    step: int | None = None,
    wrap: Wrap | None = None,
    arch: str = "decoder",
) -> tuple[nnx.GraphDef, nnx.State, ModelConfig, dict[str, Any]]:
    """The model (graphdef + full state) of a jaxllm checkpoint directory, weights only.

    The model and optimizer configs come from the checkpoint's own metadata, so a later stage
    needs only the path. A PEFT checkpoint holds only the method's variables: its base is
    loaded from the `base_checkpoint` its metadata names (recursively, merged), and the
    method put on it (the returned state holds its variables; `merge_peft` folds LoRA in,
    the other methods stay). A final checkpoint written with `peft_folded` in its metadata
    holds prefixes / prompts without their training-only MLP. `wrap` rebuilds
    a stage's head around the decoder (reward/value checkpoints). `arch`: the kind of model
    the caller runs; a checkpoint of the other kind is refused in one line. Returns
    `(graphdef, state, model_cfg, meta)`.
    """
    from jaxllm.config import from_dict  # local: avoids a cycle at import time

    if not is_remote(storage_path(ckpt_dir)) and not Path(ckpt_dir).is_dir():  # never make it
        raise ConfigError(f"{ckpt_dir}: no such checkpoint directory")
    ckpt = Checkpointer(Path(ckpt_dir), async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise ConfigError(f"config key 'inputs.checkpoint': no checkpoint in {ckpt_dir}")
    meta = ckpt.read_meta(step)
    if "model" not in meta or "config" not in meta:
        raise ConfigError(f"{ckpt_dir}/{step}: not a jaxllm model checkpoint (no model metadata)")
    run_cfg = from_dict(meta["config"])
    m = from_dict({"stage": "generate", "model": meta["model"]}).model
    check_arch(m, arch, f"{ckpt_dir}/{step}", run_cfg.stage)
    axes = dict(mesh.shape) if mesh is not None else {}  # a caller's mesh may lack some axes
    check_model_mesh(m, axes.get("fsdp", 1), axes.get("tensor", 1), rules, f" of {ckpt_dir}")
    filt = trainable_filter(run_cfg.peft)
    if run_cfg.peft.enabled:
        graphdef, params, frozen = _peft_model(
            Path(ckpt_dir), step, meta, run_cfg, mesh, rules, wrap, arch
        )
    else:
        build = model_fn(m, 0)
        fn = (lambda: wrap(build(), nnx.Rngs(0))) if wrap else build
        if meta.get("quantize"):  # written by stage quantize: int weights + scales
            fn = _quantized_fn(fn, from_dict({"stage": "quantize", "quantize": meta["quantize"]}))
        graphdef, params, _ = nnx.split(nnx.eval_shape(fn), filt, ...)
        frozen = _materialised_rest(fn, filt, mesh, rules)
    params, meta = restore_params(ckpt, step, params, mesh, rules)
    ckpt.close()
    return graphdef, nnx.merge_state(params, frozen), m, meta


def check_arch(m: ModelConfig, want: str, where: str, stage: str) -> None:
    """A checkpoint's model must be the kind the stage runs (`model.arch`): a decoder stage
    given an encoder's checkpoint (or the reverse) stops here with one line, not deep inside
    the model's constructor."""
    if m.arch != want:
        runs = "mlm, classify" if want == "encoder" else "pretrain, sft, ..."
        raise ConfigError(
            f"{where}: holds {_a(m.arch)} (model.arch: {m.arch}, written by stage {stage}), "
            f"and this stage runs {_a(want)}; give it a checkpoint of {_a(want)} stage ({runs})"
        )


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")


def _peft_model(
    ckpt_dir: Path, step: int, meta: dict, run_cfg, mesh, rules: str, wrap: Wrap | None,
    arch: str = "decoder",
) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:  # fmt: skip
    """(graphdef, method variables, frozen) of a PEFT checkpoint: its base loaded (merged)
    with the method freshly put on it, whose values the caller restores."""
    name = run_cfg.peft.method
    base = meta.get("base_checkpoint")
    if not base:
        raise ConfigError(f"{ckpt_dir}/{step}: {name} checkpoint names no base_checkpoint")
    if not Path(base).is_dir():
        raise ConfigError(
            f"{ckpt_dir}/{step}: the {name} base checkpoint {base} is gone; move or copy the "
            "base's run together with this one (base_checkpoint is kept relative to it)"
        )
    if arch == "encoder":  # the base's encoder, whatever heads it was saved with (an MLM's)
        from jaxllm.trainers.encoder_model import load_encoder_model  # local: a cycle

        bg, bstate = load_encoder_model(Path(base), mesh, rules).encoder()
    else:
        bg, bstate, bm, _ = load_checkpoint_model(Path(base), mesh, rules, arch=arch)
        for key in SHAPE_KEYS:  # the base replaced since (e.g. re-imported other chat tokens)
            want, got = meta["model"].get(key), getattr(bm, key)
            if want is not None and want != got:
                raise ConfigError(
                    f"{ckpt_dir}/{step}: its base {base} now has model.{key} {got}, this "
                    f"{name} run was trained on {want}: the base changed since (an import "
                    "redone with other hf.chat_tokens?); put back the base it was trained on"
                )
    model = nnx.merge(bg, bstate)
    left = merge_peft(model)
    if left:
        raise ConfigError(f"{ckpt_dir}/{step}: its base {base} is itself a {left[0]} run")
    model = wrap(model, nnx.Rngs(0)) if wrap else model
    if run_cfg.quantize.enabled and not is_quantized(bstate):  # QLoRA on a float base
        model = quantize_loaded(model, run_cfg.quantize, mesh, rules)
    token_ids = peft_token_ids(run_cfg.peft, meta.get("tokenizer", ""))
    with nnx.use_eager_sharding(False):
        apply_peft(model, run_cfg.peft, nnx.Rngs(0), token_ids)
    if meta.get("peft_folded"):
        fold_reparameterisations(model)
    graphdef, params, frozen = nnx.split(model, trainable_filter(run_cfg.peft), ...)
    params = master_weights(params)  # trained variables were saved as float32
    return graphdef, params, frozen


def peft_token_ids(peft: PeftConfig, tokenizer: str | Path) -> tuple[int, ...]:
    """`peft.trainable_tokens` as ids of the run's tokenizer (a training run's
    `inputs.tokenizer` or its input checkpoint's; a PEFT checkpoint's own when reloaded), one
    token each: a vocabulary piece (an added/special token, `Ġword`) or a string that
    encodes to exactly one token. `()` when none are asked for."""
    if not peft.trainable_tokens:
        return ()
    if not tokenizer:
        raise ConfigError(
            "config key 'peft.trainable_tokens': no tokenizer to resolve them with; set "
            "inputs.tokenizer"
        )
    from jaxllm.interop import load_tokenizer  # local: interop is only needed here

    tok = load_tokenizer(Path(tokenizer))
    ids = []
    for text in peft.trainable_tokens:
        tid = tok.piece_to_id(text)
        if tok.id_to_piece(tid) != text:  # not a piece as written: its encoding, if one token
            encoded = tok.encode(text)
            if len(encoded) != 1:
                raise ConfigError(
                    f"config key 'peft.trainable_tokens': {text!r} is not a single token of "
                    f"{tokenizer} (it encodes to {len(encoded)}); list vocabulary tokens"
                )
            tid = encoded[0]
        ids.append(int(tid))
    if len(set(ids)) != len(ids):
        raise ConfigError(
            f"config key 'peft.trainable_tokens': two of {list(peft.trainable_tokens)} are the "
            f"same token of {tokenizer} (ids {ids})"
        )
    return tuple(ids)


def _quantized_fn(fn: Callable[[], nnx.Module], cfg) -> Callable[[], nnx.Module]:
    def build() -> nnx.Module:
        model = fn()
        with nnx.use_eager_sharding(False):
            quantize_model(model, cfg.quantize)
        return model

    return build


def quantize_loaded(model: nnx.Module, q: QuantizeConfig, mesh, rules: str) -> nnx.Module:
    """A loaded model with its `q.scope` weights quantised (models/quant.py), computed
    under jit straight into the quantised weights' shardings."""
    graphdef, state = nnx.split(model)
    graphdef, state = quantize_state(graphdef, state, q, mesh, rules)
    return nnx.merge(graphdef, state)


def quantize_state(
    graphdef: nnx.GraphDef, state: nnx.State, q: QuantizeConfig, mesh, rules: str = "dp"
) -> tuple[nnx.GraphDef, nnx.State]:
    """`(graphdef, state)` of a loaded model with the weights `q.scope` matches quantised
    (`q.method`: int8 / int4; `method: none`, or a state already quantised as `q` asks,
    comes back as it is; a state quantised otherwise is an error: it is not requantised).
    What generate, score, eval and a server call on a model they loaded; errors name the
    `quantize.*` key."""
    if not q.enabled:
        return graphdef, state
    if is_quantized(state):
        check_same_quantization(state, q)
        return graphdef, state

    def quantized(state: nnx.State) -> nnx.Module:
        model = nnx.merge(graphdef, state)
        with nnx.use_eager_sharding(False):
            quantize_model(model, q)
        return model

    try:
        new_graphdef, abstract = nnx.split(nnx.eval_shape(lambda: quantized(state)))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    shardings = state_shardings(abstract, mesh, rules)
    new = jax.jit(lambda s: nnx.state(quantized(s)), out_shardings=shardings)(state)
    return new_graphdef, new


def check_same_quantization(state: nnx.State, q: QuantizeConfig) -> None:
    """Raises ConfigError when a quantised state's weights are not what `q` would make:
    another method, or (int4) another group along some weight's grouped input axis. Read
    from the weights themselves: int dtype, and each scale's shape against its weight's
    (int4 scales hold one value per group on that axis; int8 reduce the input axes to 1)."""
    flat = dict(nnx.to_flat_state(state))
    have_method, have_group, same = "", 0, True
    for path, w in flat.items():
        if not isinstance(w, QuantWeight):
            continue
        scale = flat.get((*path[:-1], f"{path[-1]}{QUANT_SCALE}"))
        method = "int4" if jnp.dtype(w.get_value().dtype) == jnp.int4 else "int8"
        have_method = have_method or method
        same &= method == q.method
        if method != "int4" or scale is None:
            continue
        shape, scale_shape = w.get_value().shape, scale.get_value().shape
        for size, n_groups in zip(shape, scale_shape):
            if size != n_groups and n_groups:  # the grouped axis (channelwise axes keep size)
                group = size // n_groups
                have_group = max(have_group, group)
                same &= group == min(q.group_size, size)
    if not same:
        have = f"int4, group_size {have_group}" if have_method == "int4" else have_method
        want = f"int4, group_size {q.group_size}" if q.method == "int4" else q.method
        raise ConfigError(
            f"config key 'quantize.method': the checkpoint is already quantised ({have}) and "
            f"is not requantised as {want}; drop the quantize section or ask for {have}"
        )


def folded_final_save(graphdef: nnx.GraphDef, filt: Any) -> Callable[[TrainState], tuple]:
    """`state -> (tree, meta)`: what a run's last checkpoint holds instead of the whole
    train state: `{"params", "step"}` with the PEFT reparameterisations (prefix MLP, prompt
    encoder) folded into the values they produce, and `{"peft_folded": True}` for its
    metadata. (Earlier checkpoints keep the MLP and its optimizer state, to resume.)"""

    @jax.jit
    def fold(state: TrainState) -> dict[str, Any]:
        model = nnx.merge(graphdef, state.params, state.frozen)
        fold_reparameterisations(model)
        return {"params": nnx.state(model, filt), "step": state.step}

    return lambda state: (fold(state), {"peft_folded": True})


def restore_folded(
    ckpt: Checkpointer, step: int, graphdef: nnx.GraphDef, state: TrainState, filt: Any,
    mesh, rules: str,
) -> tuple[nnx.GraphDef, TrainState, Any]:  # fmt: skip
    """The inverse of `folded_final_save`: `(graphdef, state, shardings)` of the folded model
    (prefixes / prompts as values, no MLP) built from a run's live `state`, its trained
    variables read from the folded checkpoint `step` (weights only: no optimizer state)."""
    built: dict[str, nnx.GraphDef] = {}

    def fold(params: nnx.State, frozen: nnx.State) -> tuple[nnx.State, nnx.State]:
        model = nnx.merge(graphdef, params, frozen)
        fold_reparameterisations(model)
        built["graphdef"], params, rest = nnx.split(model, filt, ...)
        return params, rest

    params, frozen = jax.jit(fold)(state.params, state.frozen)
    params, _ = restore_params(ckpt, step, params, mesh, rules)
    folded = state.replace(
        step=jnp.asarray(step, jnp.int32), params=params, frozen=frozen, opt_state=()
    )
    shardings = state_shardings(folded, mesh, rules)
    return built["graphdef"], jax.device_put(folded, shardings), shardings


def fresh_train_state(params: nnx.State, frozen: nnx.State, tx, mesh, rules: str, seed: int):
    """A `TrainState` of these variables with a fresh optimizer state, built in its
    shardings (the inputs may already be sharded); trained weights become float32 master
    weights (`master_weights`). Returns `(state, shardings)`."""

    def init(params: nnx.State, frozen: nnx.State) -> TrainState:
        params = master_weights(params)  # e.g. a bf16 import being fine-tuned
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            frozen=frozen,
            opt_state=tx.init(params),
            rng=jax.random.key_data(jax.random.key(seed)),
        )

    shardings = state_shardings(jax.eval_shape(init, params, frozen), mesh, rules)
    return jax.jit(init, out_shardings=shardings)(params, frozen), shardings


def load_frozen_model(
    ckpt_dir: Path,
    mesh,
    rules: str = "dp",
    wrap: Wrap | None = None,
    quantize: QuantizeConfig | None = None,
) -> tuple[nnx.GraphDef, nnx.State, Any, ModelConfig, dict[str, Any]]:
    """A checkpoint's model for a fixed role — a DPO/PPO reference, a distillation teacher, a
    reward model, export — to pass to a step as `consts`: LoRA merged into plain weights,
    the other PEFT methods kept (they cannot be merged). Only weights are read
    (`load_checkpoint_model`). `quantize` (QLoRA's reference: the policy's quantised base)
    quantises it after the merge. Returns `(graphdef, state, shardings, model_cfg, meta)`."""
    graphdef, state, m, meta = load_checkpoint_model(Path(ckpt_dir), mesh, rules, wrap=wrap)
    # QLoRA: int base weights cannot take the merged update, the adapters stay beside them
    if any(method.mergeable for method in methods_in(state)) and not is_quantized(state):
        model = nnx.merge(graphdef, state)
        merge_peft(model)
        graphdef, state = nnx.split(model)
    if quantize is not None:
        graphdef, state = quantize_state(graphdef, state, quantize, mesh, rules)
    return graphdef, state, jax.tree.map(lambda x: x.sharding, state), m, meta


def check_same_vocab(key: str, other: ModelConfig, other_meta: dict[str, Any], m: ModelConfig,
                     tok_path: str) -> None:  # fmt: skip
    """Raises `ConfigError` naming `key` when the checkpoint there (a DPO reference, a reward
    model) reads token ids of another vocabulary than the policy `m` trained with `tok_path`:
    a different vocab_size, or a local tokenizer file with other bytes."""
    if other.vocab_size != m.vocab_size:
        raise ConfigError(
            f"config key '{key}': that model's vocab_size {other.vocab_size} differs from the "
            f"policy's ({m.vocab_size}); both must use the same tokenizer"
        )
    a, b = (_tokenizer_bytes(p) for p in (other_meta.get("tokenizer", ""), tok_path))
    if a is not None and b is not None and a != b:
        raise ConfigError(
            f"config key '{key}': that model's tokenizer ({other_meta['tokenizer']}) is not the "
            f"policy's ({tok_path}); both must use the same tokenizer"
        )


def _tokenizer_bytes(path: str) -> bytes | None:
    """The bytes of a local tokenizer (`tokenizer.model`, or `tokenizer.json` in a
    directory), or None when there is no such file here."""
    p = Path(path) if path and "://" not in path else None
    if p is not None and p.is_dir():
        p = next((p / n for n in ("tokenizer.model", "tokenizer.json") if (p / n).is_file()), None)
    return p.read_bytes() if p is not None and p.is_file() else None
