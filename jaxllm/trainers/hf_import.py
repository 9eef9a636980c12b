"""`stage: import` — a HF model directory (config.json + safetensors) → a jaxllm checkpoint at
step 0 in `<run_dir>/checkpoints`, loadable by `load_checkpoint_model` and `stage: generate`,
plus the model's tokenizer next to it (sentencepiece `tokenizer.model` copied as is, or the
`tokenizers` files of a `tokenizer.json` model in `<run_dir>/tokenizer/`)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import Config, ModelConfig, to_dict
from jaxllm.errors import ConfigError
from jaxllm.interop import HF_TOKENIZER_FILES, load_hf_params, read_hf_config, to_model_config
from jaxllm.models import Decoder
from jaxllm.rundir import RunDir
from jaxllm.sharding import make_mesh
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
    family, m = to_model_config(read_hf_config(hf_dir), dtype, where=str(hf_dir / "config.json"))
    state = build_state(hf_dir, family, m, cfg)
    tok_path = copy_tokenizer(hf_dir, out)
    ckpt = Checkpointer(checkpoint_dir(out), keep=1, async_save=False)
    meta = {"config": to_dict(cfg), "model": to_dict(m), "tokenizer": tok_path, "step": 0}
    ckpt.save(0, state, meta)
    ckpt.close()
    return {
        "params": count_params(state.params),
        "family": family,
        "source": str(hf_dir),
        "dtype": dtype,
        "outputs": {"checkpoint": str(checkpoint_dir(out)), "tokenizer": tok_path},
    }


def build_state(hf_dir: Path, family: str, m: ModelConfig, cfg: Config) -> TrainState:
    """A step-0 TrainState whose params are the HF weights, built in its shardings.

    The params are placed by the loader; `init` adds a fresh optimizer state (what
    `load_checkpoint_model` restores into) under jit, so XLA drops the random init it never
    uses and nothing is gathered on one device.
    """
    mesh = make_mesh(cfg.mesh)
    tx = make_optimizer(cfg.train.optim, cfg.train.steps)

    def model_fn() -> Decoder:
        return Decoder(m, rngs=nnx.Rngs(cfg.seed))

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
    params = load_hf_params(hf_dir, family, m, abstract_params, shardings.params)
    return jax.jit(init, out_shardings=shardings, donate_argnums=0)(params)


def copy_tokenizer(hf_dir: Path, out: Path) -> str:
    """Copies the HF tokenizer into the run directory; returns its path ("" when none)."""
    if (hf_dir / "tokenizer.model").is_file():
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
