"""`stage: import` — a HF model directory (config.json + safetensors) → a jaxllm checkpoint at
step 0 in `<run_dir>/checkpoints`, loadable by `load_checkpoint_model` and `stage: generate`,
plus the model's tokenizer next to it (sentencepiece `tokenizer.model` copied as is, or the
`tokenizers` files of a `tokenizer.json` model, with its generation_config.json, in
`<run_dir>/tokenizer/`; `hf.chat_tokens` takes the tokenizer.json where both are). BERT checkpoints
(`model_type: bert`) go to `bert_interop.import_bert`."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxllm.config import Config, ModelConfig, replace, to_dict
from jaxllm.errors import ConfigError
from jaxllm.interop import (
    HF_TOKENIZER_FILES,
    HFTokenizer,
    load_hf_params,
    read_hf_config,
    to_model_config,
)
from jaxllm.interop.hf_tokenizer import add_special_tokens
from jaxllm.models import Decoder
from jaxllm.models.layers import ParamKeys
from jaxllm.rundir import RunDir
from jaxllm.sharding import make_mesh
from jaxllm.tokenizer.chat import END_THINK, END_TOKEN, ROLE_TOKENS, THINK
from jaxllm.trainers.lm import checkpoint_dir
from jaxllm.training.checkpoint import Checkpointer
from jaxllm.training.optim import make_optimizer
from jaxllm.training.state import TrainState, count_params, state_shardings


def run(cfg: Config, run_dir: RunDir) -> dict[str, Any]:
    hf = cfg.hf  # type: ignore[attr-defined]
    if not hf.path:
        raise ConfigError("config key 'hf.path' is empty: set it to a HF model directory")
    return import_hf(Path(hf.path).expanduser(), Path(run_dir.path), cfg, hf.dtype)


def import_hf(hf_dir: Path, out: Path, cfg: Config, dtype: str = "float32") -> dict[str, Any]:
    """Converts `hf_dir` into `out/checkpoints` (+ tokenizer); returns the stage summary."""
    if not hf_dir.is_dir():
        raise ConfigError(f"config key 'hf.path': {hf_dir} is not a directory")
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"config key 'hf.dtype': expected float32 or bfloat16, got '{dtype}'")
    hf = read_hf_config(hf_dir)
    if hf.get("model_type") == "bert":
        if cfg.hf.chat_tokens:
            raise ConfigError("config key 'hf.chat_tokens': BERT models take no chat template")
        from jaxllm.trainers.bert_interop import import_bert

        return import_bert(hf_dir, out, cfg, hf, dtype)
    family, m = to_model_config(hf, dtype, where=str(hf_dir / "config.json"))
    tok_path = copy_tokenizer(hf_dir, out, prefer_json=cfg.hf.chat_tokens)
    added, vocab = add_chat_tokens(tok_path) if cfg.hf.chat_tokens else (0, 0)
    state, m = build_state(hf_dir, family, m, cfg, grow_to=vocab)
    ckpt = Checkpointer(checkpoint_dir(out), keep=1, async_save=False, save_concurrent_gb=1)
    meta = {"config": to_dict(cfg), "model": to_dict(m), "tokenizer": tok_path, "step": 0}
    # the source's token ids, for an export of this checkpoint when there is no tokenizer
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    meta["hf_special_ids"] = {k: hf[k] for k in keys if hf.get(k) is not None}
    ckpt.save(0, state, meta)
    ckpt.close()
    return {
        "params": count_params(state.params),
        "family": family,
        "source": str(hf_dir),
        "dtype": dtype,
        "chat_tokens_added": added,
        "vocab_size": m.vocab_size,
        "outputs": {"checkpoint": str(checkpoint_dir(out)), "tokenizer": tok_path},
    }


def build_state(
    hf_dir: Path, family: str, m: ModelConfig, cfg: Config, grow_to: int = 0
) -> tuple[TrainState, ModelConfig]:
    """A step-0 TrainState whose params are the HF weights, built in its shardings, and its
    model config. With `grow_to` > the model's vocabulary, the embedding (and an untied
    head) get new rows up to it, each the mean of the existing rows plus a little noise
    (`_grow_vocab`, seeded by `cfg.seed`).

    The params are placed by the loader; `init` adds the rest of the state under jit, so XLA
    drops the random init it never uses and nothing is gathered on one device. The fresh
    optimizer state (written so the checkpoint is a complete train state; loading reads only
    the weights) comes from `fresh_opt_state`, whose zero leaves share buffers: the state is
    for writing only, and must not be donated to a train step.
    """
    mesh = make_mesh(cfg.mesh)
    tx = make_optimizer(cfg.train.optim, cfg.train.steps)
    hf_m, m = m, replace(m, vocab_size=max(m.vocab_size, grow_to))

    def model_fn(m: ModelConfig = m) -> Decoder:
        return Decoder(m, rngs=ParamKeys(cfg.seed))

    def init(params: nnx.State) -> TrainState:
        _, _, frozen = nnx.split(model_fn(), nnx.Param, ...)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            frozen=frozen,
            opt_state=tx.init(params),
            rng=jax.random.key_data(jax.random.key(cfg.seed)),
        )

    abstract_params = nnx.split(nnx.eval_shape(model_fn), nnx.Param, ...)[1]
    shardings = state_shardings(jax.eval_shape(init, abstract_params), mesh, cfg.mesh.rules)
    if hf_m.vocab_size == m.vocab_size:
        params = load_hf_params(hf_dir, family, m, abstract_params, shardings.params)
    else:
        hf_abstract = nnx.split(nnx.eval_shape(lambda: model_fn(hf_m)), nnx.Param, ...)[1]
        hf_shardings = state_shardings(hf_abstract, mesh, cfg.mesh.rules)
        params = load_hf_params(hf_dir, family, hf_m, hf_abstract, hf_shardings)
        grow = jax.jit(
            lambda p: _grow_vocab(p, m.vocab_size, jax.random.key(cfg.seed)),
            out_shardings=shardings.params,
            donate_argnums=0,
        )
        with warnings.catch_warnings():
            # Donated so that every unchanged weight is aliased, not copied; the two resized
            # arrays cannot be, and jax says so: expected, their old buffers are freed anyway.
            warnings.filterwarnings("ignore", "Some donated buffers were not usable")
            params = grow(params)
    opt_state = fresh_opt_state(tx, params, shardings.opt_state)
    rest = shardings.replace(opt_state=None)
    state = jax.jit(lambda p: init(p).replace(opt_state=None), out_shardings=rest, donate_argnums=0)
    return state(params).replace(opt_state=opt_state), m


# The variance of the new rows' noise, as a fraction of each dimension's variance over the old
# rows: transformers' `resize_token_embeddings(mean_resizing=True)` scale (there on the full
# covariance; here per dimension, which needs no D x D matrix).
GROW_NOISE_VAR = 1e-5


def _grow_vocab(params: nnx.State, vocab: int, key: jax.Array) -> nnx.State:
    """The embedding [V, D] (and an untied head [D, V]) padded to `vocab`: each new row the
    mean of the old rows plus `N(0, GROW_NOISE_VAR * var_d)` per dimension d (var_d: the old
    rows' variance there), so the new tokens start near an "average" token (old logits are
    unchanged, new ones near the mean's) yet distinct: identical rows get identical gradients
    and would stay tied through any training that does not touch them."""

    def pad(x: jax.Array, axis: int, k: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=axis, keepdims=True)
        std = jnp.std(x32, axis=axis, keepdims=True)
        shape = list(x.shape)
        shape[axis] = vocab - x.shape[axis]
        noise = jax.random.normal(k, shape, jnp.float32) * std * GROW_NOISE_VAR**0.5
        return jnp.concatenate([x, (mean + noise).astype(x.dtype)], axis=axis)

    k_embed, k_head = jax.random.split(key)
    emb = params["embed"]["embedding"]
    emb.set_value(pad(emb.get_value(), 0, k_embed))
    if "head" in params:
        params["head"].set_value(pad(params["head"].get_value(), 1, k_head))
    return params


def add_chat_tokens(tok_path: str) -> tuple[int, int]:
    """Adds the chat template's tokens to an imported tokenizer.json that lacks them;
    returns (tokens added, new vocabulary size)."""
    path = Path(tok_path) / "tokenizer.json" if tok_path else Path()
    if not tok_path or not path.is_file():
        raise ConfigError(
            "config key 'hf.chat_tokens': needs a tokenizer.json model (this checkpoint has "
            f"{'a sentencepiece tokenizer.model' if tok_path else 'no tokenizer'})"
        )
    added = add_special_tokens(path, [*ROLE_TOKENS.values(), END_TOKEN, THINK, END_THINK])
    return added, HFTokenizer.load(path).vocab_size


def fresh_opt_state(tx: optax.GradientTransformation, params: Any, shardings: Any) -> Any:
    """`tx.init(params)` placed on `shardings`, with every all-zero leaf (Adam's moments) one
    shared zeros array per shape, dtype and sharding.

    Distinct zero moments would hold two more copies of the model in host memory just to
    write zeros to the checkpoint (an f32 Adam import peaked at 3.9x the checkpoint's size);
    shared, they cost about one layer's weights. Which leaves are zero is computed under jit
    (XLA folds it to constants); any others are built as usual.
    """

    def leaves(p: Any) -> list[jax.Array]:
        return jax.tree.leaves(tx.init(p))

    is_zero = [bool(z) for z in jax.jit(lambda p: [jnp.all(x == 0) for x in leaves(p)])(params)]
    where = jax.tree.leaves(shardings)
    nonzero = jax.jit(
        lambda p: [x for x, z in zip(leaves(p), is_zero) if not z],
        out_shardings=[s for s, z in zip(where, is_zero) if not z],
    )
    built = iter(nonzero(params))
    zeros: dict[tuple, jax.Array] = {}
    out = []
    for x, s, z in zip(jax.eval_shape(leaves, params), where, is_zero, strict=True):
        key = (x.shape, x.dtype, s)
        if z and key not in zeros:
            zeros[key] = jax.jit(jnp.zeros, static_argnums=(0, 1), out_shardings=s)(*key[:2])
        out.append(zeros[key] if z else next(built))
    return jax.tree.unflatten(jax.tree.structure(jax.eval_shape(tx.init, params)), out)


def copy_tokenizer(hf_dir: Path, out: Path, prefer_json: bool = False) -> str:
    """Copies the HF tokenizer into the run directory; returns its path ("" when none). A
    directory with both keeps `tokenizer.model` unless `prefer_json` (`hf.chat_tokens`: new
    tokens go into the tokenizer.json, which gives the same ids)."""
    out.mkdir(parents=True, exist_ok=True)
    use_json = prefer_json and (hf_dir / "tokenizer.json").is_file()
    if (hf_dir / "tokenizer.model").is_file() and not use_json:
        dest = out / "tokenizer.model"
        shutil.copyfile(hf_dir / "tokenizer.model", dest)
        return str(dest)
    if (hf_dir / "tokenizer.json").is_file():
        dest = out / "tokenizer"
        dest.mkdir(parents=True, exist_ok=True)
        for name in HF_TOKENIZER_FILES:
            if (hf_dir / name).is_file():
                shutil.copyfile(hf_dir / name, dest / name)
        return str(dest)
    return ""
