"""Prompt tuning (Lester et al. 2021) and P-tuning's prompt encoder (Liu et al. 2021): P
trainable input embeddings (`peft.num_virtual_tokens`) put before the tokens.

The model holds one `Prompt` module (`model.prompt`); `prompt()` returns the virtual
embeddings [P, D]. The decoder runs them in front of every row (RoPE positions -P..-1,
no learned or sinusoidal position: the real tokens keep their positions, so batches,
loss masks and targets are untouched; segment `GLOBAL_SEGMENT`, seen by every document of a
packed row) and returns the real tokens' columns only; a KV cache starts with them. The
encoder puts them before `[CLS]` (models/encoder.py). Parameters: P·d.

They start as P random vocabulary embeddings (the paper's "sampled vocabulary"
initialisation), so prompt tuning does not start at the base model's outputs. With
`peft.prompt_encoder: mlp` the embeddings go through a residual MLP `e + relu(e W1 + b1) W2
+ b2` (hidden `prompt_hidden`; W2, b2 start at zero, so at the plain prompt), adding
2·d·h + h + d parameters while training; `fold` replaces it by the embeddings it gives.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import PeftConfig
from jaxllm.models.attention import Attention
from jaxllm.models.layers import ParamKeys


class PromptParam(nnx.Param):
    """A prompt-tuning weight (the virtual embeddings, or their prompt encoder)."""


def _p(x: jax.Array, axes: tuple) -> PromptParam:
    return PromptParam(x.astype(jnp.float32), out_sharding=axes)


class Prompt(nnx.Module):
    """The virtual tokens' input embeddings: `prompt() -> [P, D]` (float32)."""

    def __init__(self, init_PD: jax.Array, hidden: int, rngs: nnx.Rngs | ParamKeys):
        self.n_virtual, d = init_PD.shape
        self.embedding = _p(init_PD, (None, "embed"))
        self.encoded = bool(hidden)
        if hidden:
            self.w1 = _p(
                jax.random.normal(rngs.params(), (d, hidden)) / math.sqrt(d), ("embed", None)
            )
            self.b1 = _p(jnp.zeros((hidden,)), (None,))
            self.w2 = _p(jnp.zeros((hidden, d)), (None, "embed"))
            self.b2 = _p(jnp.zeros((d,)), ("embed",))

    def __call__(self) -> jax.Array:
        e_PD = self.embedding[...]
        if not self.encoded:
            return e_PD
        h_PH = jax.nn.relu(e_PD @ self.w1[...] + self.b1[...])
        return e_PD + h_PH @ self.w2[...] + self.b2[...]

    def fold(self) -> bool:
        """Replaces the prompt encoder by the embeddings it gives, in place."""
        if not self.encoded:
            return False
        self.embedding = _p(self(), (None, "embed"))
        for name in ("w1", "b1", "w2", "b2"):
            delattr(self, name)
        self.encoded = False
        return True


def apply_prompt(
    backbones: list[tuple[str, nnx.Module]], cfg: PeftConfig, rngs: nnx.Rngs | ParamKeys
) -> list[str]:
    """Attaches a `Prompt` to every backbone (decoder or encoder), in place. The fused
    attention kernels take no virtual slots, so the backbone's attention runs `xla`."""
    paths = []
    for path, model in backbones:
        if model.prompt is not None:
            raise ValueError(f"peft: {path}prompt exists already")
        table_VD = model.embed.embedding[...].astype(jnp.float32)
        ids = jax.random.randint(rngs.params(), (cfg.num_virtual_tokens,), 0, table_VD.shape[0])
        hidden = (cfg.prompt_hidden or model.cfg.d_model) if cfg.prompt_encoder == "mlp" else 0
        model.prompt = Prompt(table_VD[ids], hidden, rngs)
        for _, module in nnx.iter_modules(model):
            if isinstance(module, Attention):
                module.kernel = "xla"
        paths.append(f"{path}prompt")
    return paths


def prompt_count(d: int, cfg: PeftConfig) -> int:
    """P·d, plus the prompt encoder while it trains."""
    if cfg.prompt_encoder == "none":
        return cfg.num_virtual_tokens * d
    h = cfg.prompt_hidden or d
    return cfg.num_virtual_tokens * d + 2 * d * h + h + d
