"""The BERT-style encoder as a Flax NNX module: bidirectional self-attention over the real
tokens of each row, token + position + token-type embeddings, BERT's post-LN blocks (pre-LN
as an option), and the pooler over `[CLS]`. Positions are BERT's learned table, or
(`positions: rope`) rotary angles in every attention layer, which see only relative
positions: a tiny encoder learns to read its neighbours much sooner that way (tiny_mlm.yaml),
or (`sinusoidal`) fixed sinusoids added to the embeddings.

Run it functionally like the decoder (`nnx.split` once, `nnx.merge` inside jitted code). It
reuses the decoder's parts: `Attention` (no causal mask: `attend` with the padding mask, GQA
and LoRA included), `MLP` (`mlp: gelu_exact` is BERT's GELU), `Norm`, `Embed`, `param`.

Padding: `segment_ids_BL` is 1 on real tokens and 0 on padding (any positive ids: tokens
attend within equal ids, so packed rows work too); padded positions attend to nothing and
their features are only defined, not meaningful. Heads (MLM, NSP, classifier) are in
`models/heads.py`.

PEFT methods (models/peft) attach as in the decoder: bottleneck adapters after each
sublayer (before the post-LN LayerNorm, as Houlsby et al. place them), prefix keys/values
seen by every real token, and prompt-tuning virtual tokens before `[CLS]` (embedding
LayerNorm, no position or token-type embedding: the real tokens keep theirs; with
`positions: rope` the virtual tokens sit at -P..-1, as in the decoder, so real tokens keep
their positions 0..L-1). Prefix keys are learned as they are used: RoPE rotates the real
tokens' keys only, never the prefix's (as a cached key, it is not rotated again). Virtual tokens
attend to every real token of their row (BERT's full attention), so with several documents
packed in a row they would mix them: the encoder stages do not pack. The outputs cover the
real tokens only (`[CLS]` stays at column 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.models.attention import GLOBAL_SEGMENT, Attention, Prefix
from jaxllm.models.layers import (
    MLP,
    Embed,
    Norm,
    ParamKeys,
    adapted,
    compute_dtype,
    constrain,
    dropout,
    param,
    rope_angles,
    rope_inv_freq,
    sinusoidal_positions,
)

Rope = tuple[jax.Array, jax.Array] | None

_RESIDUAL = ("act_batch", "act_length", "act_embed")


def bidirectional_mask(segment_ids_BL: jax.Array, n_prefix: int = 0) -> jax.Array:
    """[B, L, P + L] bool over P prefix slots and the L tokens: a query sees every key of its
    own segment and every `GLOBAL_SEGMENT` key (prefixes, virtual tokens); a virtual token
    sees every non-padding key of its row; padding (0) sees nothing."""
    segment_ids_BL = jnp.asarray(segment_ids_BL)  # int64 numpy ids (HF inputs) become int32
    b = segment_ids_BL.shape[0]
    prefix_BP = jnp.full((b, n_prefix), GLOBAL_SEGMENT, segment_ids_BL.dtype)
    kv_BS = jnp.concatenate([prefix_BP, segment_ids_BL], axis=1)[:, None, :]
    q_BL1 = segment_ids_BL[:, :, None]
    sees_BLS = (q_BL1 == kv_BS) | (kv_BS == GLOBAL_SEGMENT)
    sees_BLS = sees_BLS | ((q_BL1 == GLOBAL_SEGMENT) & (kv_BS != 0))
    return sees_BLS & (q_BL1 != 0)


class EncoderBlock(nnx.Module):
    """Post-LN (BERT): x = LN(x + attn(x)); x = LN(x + mlp(x)). Pre-LN: as the decoder's."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.post = cfg.norm_position == "post"
        self.attn = Attention(cfg, rngs=rngs)
        self.attn_norm = Norm(cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)
        self.mlp_norm = Norm(cfg, rngs=rngs)
        self.dropout_rate = cfg.dropout
        self.attn_adapter = nnx.data(None)  # PEFT bottleneck adapters (models/peft/adapter.py)
        self.mlp_adapter = nnx.data(None)

    def __call__(
        self,
        x_BLD: jax.Array,
        mask_BLS: jax.Array,
        key: jax.Array | None,
        rope: Rope = None,
        prefix: Prefix = None,
    ) -> jax.Array:
        attn_key, mlp_key = (None, None) if key is None else jax.random.split(key)
        lora_key = None if mlp_key is None else jax.random.fold_in(mlp_key, 1)
        if self.post:
            h_BLD = self.attn(x_BLD, mask_BLS, rope, key=attn_key, prefix=prefix)[0]
            x_BLD = self.attn_norm(x_BLD + adapted(self.attn_adapter, h_BLD))
            h_BLD = dropout(self.mlp(x_BLD, lora_key), self.dropout_rate, mlp_key)
            return constrain(self.mlp_norm(x_BLD + adapted(self.mlp_adapter, h_BLD)), _RESIDUAL)
        h_BLD = self.attn(self.attn_norm(x_BLD), mask_BLS, rope, key=attn_key, prefix=prefix)[0]
        x_BLD = x_BLD + adapted(self.attn_adapter, h_BLD)
        h_BLD = dropout(self.mlp(self.mlp_norm(x_BLD), lora_key), self.dropout_rate, mlp_key)
        return constrain(x_BLD + adapted(self.mlp_adapter, h_BLD), _RESIDUAL)


class Encoder(nnx.Module):
    """Token ids (+ token types) → contextual features [B, L, D] and the pooled `[CLS]`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.vocab_size <= 0:
            raise ValueError(
                "model.vocab_size: must be > 0 to build a model (set it from the tokenizer)"
            )
        if cfg.scan_layers:
            raise ValueError("model.scan_layers: encoders run their blocks unrolled (set false)")
        self.cfg = cfg
        self.dtype = compute_dtype(cfg)
        d, pd, std = cfg.d_model, cfg.param_dtype, cfg.init_std
        self.embed = Embed(cfg, rngs=rngs)
        learned = cfg.positions == "learned"
        self.pos_embed = (
            param(rngs, (cfg.max_seq_len, d), (None, "embed"), pd, std) if learned else None
        )
        types = max(cfg.type_vocab_size, 1)
        self.type_embed = param(rngs, (types, d), (None, "embed"), pd, std)
        self.embed_norm = Norm(cfg, rngs=rngs) if cfg.norm_position == "post" else None
        self.blocks = nnx.List([EncoderBlock(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.final_norm = Norm(cfg, rngs=rngs) if cfg.norm_position == "pre" else None
        self.pooler = param(rngs, (d, d), ("embed", None), pd, std)
        self.pooler_bias = param(rngs, (d,), (None,), pd)
        self.prefix = nnx.data(None)  # PEFT virtual slots (models/peft/prefix.py, prompt.py)
        self.prompt = nnx.data(None)

    def __call__(
        self,
        tokens_BL: jax.Array,
        *,
        segment_ids_BL: jax.Array | None = None,
        token_types_BL: jax.Array | None = None,
        positions_BL: jax.Array | None = None,
        deterministic: bool = True,
        key: jax.Array | None = None,
    ) -> jax.Array:
        """Features [B, L, D] in the compute dtype. `segment_ids_BL`: 0 marks padding
        (default: none); `token_types_BL`: sentence A (0) / B (1); `positions_BL` default
        0..L-1; dropout (`cfg.dropout`) when `deterministic=False`, which needs `key`."""
        b, l_ = tokens_BL.shape
        if self.pos_embed is not None and l_ > self.cfg.max_seq_len:  # the table's length
            raise ValueError(
                f"sequence of {l_} tokens is longer than model.max_seq_len {self.cfg.max_seq_len}"
            )
        seg_BL = jnp.ones((b, l_), jnp.int32) if segment_ids_BL is None else segment_ids_BL
        if positions_BL is None:
            positions_BL = jnp.broadcast_to(jnp.arange(l_, dtype=jnp.int32), (b, l_))
        types_BL = jnp.zeros((b, l_), jnp.int32) if token_types_BL is None else token_types_BL
        key = None if deterministic else key
        if key is None and not deterministic and self.cfg.dropout > 0:
            raise ValueError("Encoder: deterministic=False with dropout needs a `key`")
        x_BLD = self.embed(tokens_BL)
        if self.pos_embed is not None:
            x_BLD = x_BLD + self.pos_embed[...][positions_BL].astype(self.dtype)
        elif self.cfg.positions == "sinusoidal":
            pos_BLD = sinusoidal_positions(positions_BL, self.cfg.d_model)
            x_BLD = x_BLD + pos_BLD.astype(self.dtype)
        x_BLD = x_BLD + self.type_embed[...][types_BL].astype(self.dtype)
        if self.embed_norm is not None:
            x_BLD = self.embed_norm(x_BLD)
        emb_key = None if key is None else jax.random.fold_in(key, self.cfg.n_layers)
        x_BLD = constrain(dropout(x_BLD, self.cfg.dropout, emb_key), _RESIDUAL)
        x_BLD, positions_BL, seg_BL = self._prepend_prompt(x_BLD, positions_BL, seg_BL)
        prefix = None if self.prefix is None else self.prefix()
        mask_BLS = bidirectional_mask(seg_BL, 0 if prefix is None else prefix[0].shape[1])
        rope = self._rope(positions_BL)
        for i, block in enumerate(self.blocks):
            block_key = None if key is None else jax.random.fold_in(key, i)
            layer_prefix = None if prefix is None else (prefix[0][i], prefix[1][i])
            x_BLD = block(x_BLD, mask_BLS, block_key, rope, layer_prefix)
        x_BLD = x_BLD[:, x_BLD.shape[1] - l_ :]  # the real tokens' columns
        return x_BLD if self.final_norm is None else self.final_norm(x_BLD)

    def _rope(self, positions_BL: jax.Array) -> Rope:
        """RoPE angles when `positions: rope` (relative positions in attention), else None."""
        if self.cfg.positions != "rope":
            return None
        cfg = self.cfg
        inv_freq = rope_inv_freq(cfg.head_size, cfg.rope_theta, cfg.rope_scaling)
        return rope_angles(positions_BL, inv_freq)

    def _prepend_prompt(
        self, x_BLD: jax.Array, positions_BL: jax.Array, seg_BL: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(x, positions, segment ids) with prompt tuning's P virtual tokens (through the
        embedding LayerNorm) before the tokens: RoPE positions -P..-1 as in the decoder (the
        real tokens keep 0..L-1, so their relative offsets are the base model's), segment
        `GLOBAL_SEGMENT`; unchanged without a prompt."""
        if self.prompt is None:
            return x_BLD, positions_BL, seg_BL
        virtual_PD = self.prompt().astype(self.dtype)
        if self.embed_norm is not None:
            virtual_PD = self.embed_norm(virtual_PD)
        (b, _, d), p = x_BLD.shape, virtual_PD.shape[0]
        x_BLD = jnp.concatenate([jnp.broadcast_to(virtual_PD, (b, p, d)), x_BLD], axis=1)
        pos_BP = jnp.broadcast_to(jnp.arange(-p, 0, dtype=jnp.int32), (b, p))
        seg_BP = jnp.full((b, p), GLOBAL_SEGMENT, jnp.int32)
        return (
            constrain(x_BLD, _RESIDUAL),
            jnp.concatenate([pos_BP, positions_BL.astype(jnp.int32)], axis=1),
            jnp.concatenate([seg_BP, seg_BL.astype(jnp.int32)], axis=1),
        )

    def pooled(self, x_BLD: jax.Array) -> jax.Array:
        """BERT's pooler: tanh(W x[CLS] + b) [B, D] in float32 (position 0 holds `[CLS]`)."""
        cls_BD = x_BLD[:, 0].astype(jnp.float32)
        w = self.pooler[...].astype(jnp.float32)
        return jnp.tanh(cls_BD @ w + self.pooler_bias[...].astype(jnp.float32))


def make_encoder(cfg: ModelConfig, seed: int = 0) -> Encoder:
    """An `Encoder` with params from `seed` on the default device (tests, tools)."""
    with nnx.use_eager_sharding(False):
        return Encoder(cfg, rngs=ParamKeys(seed))


def encoder_params(cfg: ModelConfig) -> int:
    """Parameters of `Encoder(cfg)` (BERT's `BertModel`: embeddings, blocks, pooler)."""
    d, f, dh = cfg.d_model, cfg.d_ff, cfg.head_size
    q, kv = cfg.n_heads * dh, cfg.kv_heads * dh
    norm = d * (2 if cfg.use_bias else 1)
    attn = d * q + 2 * d * kv + q * d + ((q + 2 * kv + d) if cfg.use_bias else 0)
    mlp = 2 * d * f + ((f + d) if cfg.use_bias else 0)
    positions = cfg.max_seq_len if cfg.positions == "learned" else 0
    emb = (cfg.vocab_size + positions + max(cfg.type_vocab_size, 1)) * d
    return emb + norm + cfg.n_layers * (attn + mlp + 2 * norm) + d * d + d
