"""Trainable tokens beside LoRA (`peft.trainable_tokens`; HF PEFT's `trainable_token_indices`):
the embedding rows of K chosen ids train as a delta, the rest of the table stays frozen.

LoRA adapts dense weights only, so tokens added to a pretrained vocabulary (the chat tokens
of `hf.chat_tokens`, all starting near the mean row) would keep their start rows: the model
could hardly tell `<|user|>` from `<|assistant|>` or learn to emit `<|end|>`. A decoder gets
a `TrainableTokens` module holding the ids (static, in the graph definition: a checkpoint
reloads them by resolving the run's token strings again) and `embed_delta` [K, D] (zeros,
so the adapted model starts equal to the base). The effective table is `E + scatter(delta)`:
inputs add `delta[k]` where a token equals `ids[k]`; a tied output layer uses the same rows
(logits gain `x delta.T` at the K columns), an untied head gets its own `head_delta` [D, K].
The deltas are `nnx.LoRAParam`s (`TokenParam`), so they train, are saved and reloaded with
the LoRA adapters, and `merge_tokens` (called by `merge_lora`) folds them into the weights.
K·D (+ D·K untied) parameters, replicated: a handful of rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.models.layers import QUANT_SCALE, weight_value


class TokenParam(nnx.LoRAParam):
    """A trainable-token delta (a LoRA variable: trains, saves and merges with the adapters)."""


class TrainableTokens(nnx.Module):
    """The deltas of K token ids' embedding rows [K, D] and, for an untied head, of their
    head columns [D, K]."""

    def __init__(self, ids: Sequence[int], d: int, untied_head: bool):
        self.ids = tuple(int(i) for i in ids)
        k = len(self.ids)
        self.embed_delta = TokenParam(jnp.zeros((k, d), jnp.float32), out_sharding=(None, None))
        self.head_delta = (
            TokenParam(jnp.zeros((d, k), jnp.float32), out_sharding=(None, None))
            if untied_head
            else nnx.data(None)
        )

    def _onehot(self, tokens_BL: jax.Array) -> jax.Array:
        ids_K = jnp.asarray(self.ids, jnp.int32)
        return (tokens_BL.astype(jnp.int32)[..., None] == ids_K).astype(jnp.float32)

    def input_delta(self, tokens_BL: jax.Array) -> jax.Array:
        """[B, L, D] float32: `embed_delta[k]` where `tokens == ids[k]`, else 0."""
        return jnp.einsum("blk,kd->bld", self._onehot(tokens_BL), self.embed_delta[...])

    def _head_DK(self) -> jax.Array:
        return self.embed_delta[...].T if self.head_delta is None else self.head_delta[...]

    def add_logits(self, x_BLD: jax.Array, logits_BLV: jax.Array) -> jax.Array:
        """The output layer's share: `x @ delta` added at the K columns."""
        extra_BLK = jnp.einsum("bld,dk->blk", x_BLD.astype(jnp.float32), self._head_DK())
        return logits_BLV.at[..., jnp.asarray(self.ids, jnp.int32)].add(
            extra_BLK.astype(logits_BLV.dtype)
        )

    def output_weight(self, w_VD: jax.Array) -> jax.Array:
        """The output layer [V, D] with the deltas in (what a fused loss reads)."""
        return w_VD.at[jnp.asarray(self.ids, jnp.int32)].add(self._head_DK().T.astype(w_VD.dtype))


def apply_tokens(backbones: list[tuple[str, nnx.Module]], ids: Sequence[int]) -> list[str]:
    """Attaches `TrainableTokens` for `ids` to every decoder backbone, in place; returns their
    paths. An encoder, a repeated id or one outside the vocabulary: ValueError."""
    if len(set(ids)) != len(ids):
        raise ValueError(f"config key 'peft.trainable_tokens': two tokens share an id ({ids})")
    paths = []
    for path, model in backbones:
        if not hasattr(model, "trainable_tokens"):
            raise ValueError(
                f"config key 'peft.trainable_tokens': {path or 'the model'} is an encoder; "
                "trainable tokens are for decoders only"
            )
        if model.trainable_tokens is not None:
            raise ValueError(f"peft: {path}trainable_tokens exists already")
        vocab = model.cfg.vocab_size
        if any(not 0 <= i < vocab for i in ids):
            raise ValueError(
                f"config key 'peft.trainable_tokens': ids {list(ids)} fall outside the "
                f"model's vocabulary of {vocab}"
            )
        model.trainable_tokens = TrainableTokens(ids, model.cfg.d_model, model.head is not None)
        paths.append(f"{path}trainable_tokens")
    return paths


def merge_tokens(model: nnx.Module) -> int:
    """Folds every decoder's token deltas into its embedding (and untied head) in float32
    and removes them, in place; returns how many decoders had some. A quantised head
    (QLoRA's int base) cannot take the float update: ValueError."""
    merged = 0
    for path, module in list(nnx.iter_modules(model)):
        tt = getattr(module, "trainable_tokens", None)
        if tt is None:
            continue
        if tt.head_delta is not None and getattr(module, "head" + QUANT_SCALE, None) is not None:
            where = ".".join(str(p) for p in (*path, "head"))
            raise ValueError(
                f"peft: the trainable tokens' head delta sits on a quantised {where} (QLoRA), "
                "which cannot hold the merged float update; keep it unmerged"
            )
        ids = jnp.asarray(tt.ids, jnp.int32)
        table = module.embed.embedding
        new = table[...].astype(jnp.float32).at[ids].add(tt.embed_delta[...])
        table.set_value(new.astype(jnp.promote_types(table.dtype, jnp.float32)))
        if tt.head_delta is not None:
            new = weight_value(module, "head", jnp.float32).at[:, ids].add(tt.head_delta[...])
            module.head.set_value(new.astype(jnp.promote_types(module.head.dtype, jnp.float32)))
        module.trainable_tokens = None
        merged += 1
    return merged


def tokens_count(model: nnx.Module) -> int:
    """K·D per decoder, and D·K more for an untied head."""
    total = 0
    for _, module in nnx.iter_modules(model):
        tt = getattr(module, "trainable_tokens", None)
        if tt is not None:
            total += tt.embed_delta.size + (0 if tt.head_delta is None else tt.head_delta.size)
    return total
