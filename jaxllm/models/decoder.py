"""The decoder-only transformer (GPT-2 and Llama families) as a Flax NNX module.

Run it functionally: `graphdef, state = nnx.split(model)` once, `nnx.merge` inside jitted code.

Two entry points:
- `__call__(tokens_BL, ...) -> logits_BLV` for training and scoring (no cache);
- `extend(tokens_BL, cache, positions_BL=...) -> (logits_BLV, cache)` appends L tokens to a
  `KVCache` (prefill: L = prompt length; decoding: L = 1) and attends over the whole cache.

Blocks are a Python list (one compiled copy per layer; fine for a few layers) or, with
`cfg.scan_layers`, one stacked block run by `jax.lax.scan` (models/scan.py: compile time
independent of depth); either way each block is optionally rematerialised (`cfg.remat`).

PEFT methods (models/peft) attach modules here: bottleneck adapters (`Block.attn_adapter`,
`Block.mlp_adapter`), prefix-tuning keys/values (`Decoder.prefix`: before slot 0 of every
layer) and prompt-tuning virtual tokens (`Decoder.prompt`: embeddings before the first
token, RoPE positions -P..-1, no learned/sinusoidal position). Both kinds of virtual slots
are seen by every real token (`GLOBAL_SEGMENT`), so each document of a packed row sees them
as if they came right before it; `features` returns the real tokens' columns only, and
`init_cache` fills the virtual slots, so generation starts after them. Trainable tokens
(`Decoder.trainable_tokens`, beside LoRA) add their rows' deltas to the embedding on input
and to the output layer (`logits`, `output_weight`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.models.attention import (
    GLOBAL_SEGMENT,
    Attention,
    KVCache,
    Prefix,
    make_mask,
    prefixed_mask,
    write_slots,
)
from jaxllm.models.layers import (
    LORA_A,
    MLP,
    QUANT_SCALE,
    RESIDUAL,
    Embed,
    Norm,
    ParamKeys,
    adapted,
    compute_dtype,
    constrain,
    dropout,
    lookup,
    param,
    project,
    rope_angles,
    rope_inv_freq,
    sinusoidal_positions,
    weight_value,
)
from jaxllm.models.scan import REMAT_POLICY, scan_blocks, scan_extend, stack_modules

_RESIDUAL = RESIDUAL
Rope = tuple[jax.Array, jax.Array] | None


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = Norm(cfg, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = Norm(cfg, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)
        self.dropout_rate = cfg.dropout
        self.attn_adapter = nnx.data(None)  # PEFT bottleneck adapters (models/peft/adapter.py)
        self.mlp_adapter = nnx.data(None)

    def __call__(
        self,
        x_BLD: jax.Array,
        mask_BLS: jax.Array,
        rope: Rope,
        *,
        kv: tuple[jax.Array, jax.Array] | None = None,
        index: jax.Array | None = None,
        key: jax.Array | None = None,
        causal: bool = False,
        segment_ids_BL: jax.Array | None = None,
        prefix: Prefix = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        attn_key, mlp_key = (None, None) if key is None else jax.random.split(key)
        h_BLD, kv = self.attn(
            self.attn_norm(x_BLD), mask_BLS, rope, kv=kv, index=index, key=attn_key,
            causal=causal, segment_ids_BL=segment_ids_BL, prefix=prefix,
        )  # fmt: skip
        x_BLD = constrain(x_BLD + adapted(self.attn_adapter, h_BLD), _RESIDUAL)
        lora_key = None if mlp_key is None else jax.random.fold_in(mlp_key, 1)
        h_BLD = dropout(self.mlp(self.mlp_norm(x_BLD), lora_key), self.dropout_rate, mlp_key)
        return constrain(x_BLD + adapted(self.mlp_adapter, h_BLD), _RESIDUAL), kv


def _remat_block(
    block: Block, policy_name: str, x_BLD, mask_BLS, rope: Rope, key, seg_BL, prefix: Prefix,
    causal: bool = True,
):  # fmt: skip
    """Runs `block` under `jax.checkpoint`, through a pure split/merge function."""
    graphdef, state = nnx.split(block)

    def run(state, x_BLD, mask_BLS, rope, key, seg_BL, prefix):
        block = nnx.merge(graphdef, state)
        return block(
            x_BLD, mask_BLS, rope, key=key, causal=causal, segment_ids_BL=seg_BL, prefix=prefix
        )[0]

    policy = REMAT_POLICY[policy_name]
    return jax.checkpoint(run, policy=policy)(state, x_BLD, mask_BLS, rope, key, seg_BL, prefix)


class Decoder(nnx.Module):
    """Token ids → next-token logits (`cfg.logits_dtype`). `cfg.vocab_size` must be set (> 0)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.vocab_size <= 0:
            raise ValueError(
                "model.vocab_size: must be > 0 to build a model (set it from the tokenizer)"
            )
        if cfg.arch != "decoder":
            raise ValueError(
                f"model.arch: this is an {cfg.arch} model (e.g. an encoder checkpoint), and this "
                "stage trains or runs a decoder"
            )
        self.cfg = cfg
        self.dtype = compute_dtype(cfg)
        d, pd = cfg.d_model, cfg.param_dtype
        self.embed = Embed(cfg, rngs=rngs)
        self.pos_embed = (
            param(rngs, (cfg.max_seq_len, d), (None, "embed"), pd, cfg.init_std)
            if cfg.positions == "learned"
            else None
        )
        blocks = [Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)]
        # scanned: one Block whose variables are the layers' stacked (the same values)
        self.blocks = stack_modules(blocks) if cfg.scan_layers else nnx.List(blocks)
        self.final_norm = Norm(cfg, rngs=rngs)
        self.head = (
            None
            if cfg.tie_embeddings
            else param(rngs, (d, cfg.vocab_size), ("embed", "vocab"), pd, cfg.init_std)
        )
        self.prefix = nnx.data(None)  # PEFT virtual slots (models/peft/prefix.py, prompt.py)
        self.prompt = nnx.data(None)
        self.trainable_tokens = nnx.data(None)  # PEFT token rows (models/peft/tokens.py)

    # ----------------------------------------------------------------- public entry points

    def __call__(
        self,
        tokens_BL: jax.Array,
        *,
        positions_BL: jax.Array | None = None,
        segment_ids_BL: jax.Array | None = None,
        deterministic: bool = True,
        key: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, L, V] (`model.logits_dtype`: float32 by default), causal per segment.

        `positions_BL` default to 0..L-1; packed rows pass positions restarting per document.
        `segment_ids_BL` (0 = padding) default to all ones. Dropout (`cfg.dropout`) runs when
        `deterministic=False`, which needs `key`.
        """
        return self.logits(
            self.features(
                tokens_BL,
                positions_BL=positions_BL,
                segment_ids_BL=segment_ids_BL,
                deterministic=deterministic,
                key=key,
            )
        )

    def features(
        self,
        tokens_BL: jax.Array,
        *,
        positions_BL: jax.Array | None = None,
        segment_ids_BL: jax.Array | None = None,
        deterministic: bool = True,
        key: jax.Array | None = None,
    ) -> jax.Array:
        """Final-norm hidden states [B, L, D] (what value/reward heads read)."""
        b, l_ = tokens_BL.shape
        if self.pos_embed is not None and l_ > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence of {l_} tokens is longer than model.max_seq_len "
                f"{self.cfg.max_seq_len} (learned positions): raise max_seq_len or cut the batch"
            )
        if positions_BL is None:
            positions_BL = jnp.broadcast_to(jnp.arange(l_, dtype=jnp.int32), (b, l_))
        kernel_seg_BL = segment_ids_BL  # None tells a fused kernel: one sequence per row
        if segment_ids_BL is None:
            segment_ids_BL = jnp.ones((b, l_), jnp.int32)
        if deterministic:
            key = None
        elif key is None and self.cfg.dropout > 0:
            raise ValueError("Decoder: deterministic=False with dropout needs a `key`")
        x_BLD = self._embed(tokens_BL, positions_BL, key)
        x_BLD, positions_BL, segment_ids_BL = self._prepend_prompt(
            x_BLD, positions_BL, segment_ids_BL
        )
        n_virtual = x_BLD.shape[1] - l_
        # every document attends to the prompt's segment -1 (`make_mask`): not the causal
        # mask within segments a fused kernel computes, so the blocks run `attend`
        causal = not n_virtual
        prefix = None if self.prefix is None else self.prefix()
        mask_BLS = prefixed_mask(segment_ids_BL, 0 if prefix is None else prefix[0].shape[1])
        rope = self._rope(positions_BL)
        if self.cfg.scan_layers:
            x_BLD = scan_blocks(
                self.blocks, x_BLD, mask_BLS, rope, key=key, remat=self.cfg.remat,
                segment_ids_BL=kernel_seg_BL, prefix=prefix, causal=causal,
            )  # fmt: skip
        else:
            x_BLD = self._unrolled(x_BLD, mask_BLS, rope, key, kernel_seg_BL, prefix, causal)
        return self.final_norm(x_BLD[:, n_virtual:])

    def extend(
        self,
        tokens_BL: jax.Array,
        cache: KVCache,
        *,
        positions_BL: jax.Array,
        segment_ids_BL: jax.Array | None = None,
        last_only: bool = False,
        at_B: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Writes L tokens at cache slots [index, index + L) and returns their logits (only
        the last column's, [B, 1, V], with `last_only`; only column `at_B[b]` of each row
        with `at_B`: right-padded rows) and the new cache. A token attends to
        earlier-or-equal slots of its own segment (padding slots have segment 0). The
        cache's index may be per row ([B]). Inference only: no dropout, no remat."""
        x_BLD = self._embed(tokens_BL, positions_BL, None)
        x_BLD, new_cache = self._extend(x_BLD, cache, positions_BL, segment_ids_BL)
        if last_only:
            x_BLD = x_BLD[:, -1:]
        elif at_B is not None:
            x_BLD = jnp.take_along_axis(x_BLD, at_B[:, None, None].astype(jnp.int32), axis=1)
        return self.logits(self.final_norm(x_BLD)), new_cache

    def _extend(
        self, x_BLD: jax.Array, cache: KVCache, positions_BL: jax.Array, segment_ids_BL
    ) -> tuple[jax.Array, KVCache]:
        """The blocks over L embedded inputs written at slots [index, index + L)."""
        b, l_ = x_BLD.shape[:2]
        if segment_ids_BL is None:
            segment_ids_BL = jnp.ones((b, l_), jnp.int32)
        index = cache.index
        seg_BS = write_slots(cache.segment_ids[:, None, :, None], segment_ids_BL[:, None, :, None],
                             index)[:, 0, :, 0]  # fmt: skip
        q_slot_L = (index[:, None] if index.ndim else index) + jnp.arange(l_)
        mask_BLS = make_mask(q_slot_L, segment_ids_BL, jnp.arange(cache.size), seg_BS)
        rope = self._rope(positions_BL)
        if self.cfg.scan_layers:
            x_BLD, ks, vs = scan_extend(self.blocks, x_BLD, mask_BLS, rope, cache.k, cache.v, index)
        else:
            ks, vs = [], []
            for block, k, v in zip(self.blocks, cache.k, cache.v, strict=True):
                x_BLD, (k, v) = block(x_BLD, mask_BLS, rope, kv=(k, v), index=index)
                ks.append(k)
                vs.append(v)
            ks, vs = tuple(ks), tuple(vs)
        return x_BLD, KVCache(k=ks, v=vs, segment_ids=seg_BS, index=index + l_)

    def init_cache(self, batch: int, size: int) -> KVCache:
        """A cache of `size` free slots per row, after the PEFT virtual slots (prefix keys and
        values, or the virtual tokens run through the blocks) when the model has them."""
        n = sum(m.n_virtual for m in (self.prefix, self.prompt) if m is not None)
        cache = KVCache.empty(self.cfg, batch, size + n)
        if self.prefix is not None:
            cache = cache.with_prefix(*self.prefix())
        if self.prompt is not None:
            x_BPD, pos_BP, seg_BP = self._prepend_prompt(
                jnp.zeros((batch, 0, self.cfg.d_model), self.dtype),
                jnp.zeros((batch, 0), jnp.int32),
                jnp.zeros((batch, 0), jnp.int32),
            )
            cache = self._extend(x_BPD, cache, pos_BP, seg_BP)[1]
        return cache

    def output_weight(self) -> jax.Array | None:
        """The output layer as [V, D] (the embedding when tied), for a loss that fuses it
        (`head_cross_entropy`), trainable tokens' deltas included; None when a LoRA adapter
        sits on the untied head."""
        if self.head is None:
            w_VD = self.embed.embedding[...]
        elif getattr(self, "head" + LORA_A, None) is not None:
            return None
        elif getattr(self, "head" + QUANT_SCALE, None) is not None:  # dequantised, float32
            w_VD = weight_value(self, "head", jnp.float32).T
        else:
            w_VD = self.head[...].T
        tokens = self.trainable_tokens
        return w_VD if tokens is None else tokens.output_weight(w_VD)

    def logits(self, x_BLD: jax.Array) -> jax.Array:
        """Output layer, tied (`x @ E.T`) or the untied head, in `model.logits_dtype`."""
        out_dtype = jnp.dtype(self.cfg.logits_dtype)
        if self.head is None:
            logits_BLV = self.embed.attend(x_BLD, out_dtype)
        else:
            logits_BLV = project(self, "head", x_BLD.astype(self.dtype), out_dtype=out_dtype)
        if self.trainable_tokens is not None:
            logits_BLV = self.trainable_tokens.add_logits(x_BLD.astype(self.dtype), logits_BLV)
        return constrain(logits_BLV, ("act_batch", "act_length", "act_vocab"))

    # ----------------------------------------------------------------------- internals

    def _unrolled(
        self, x_BLD, mask_BLS, rope: Rope, key, seg_BL, prefix: Prefix, causal: bool = True
    ) -> jax.Array:
        """The blocks one after another (each its own copy in the compiled program)."""
        for i, block in enumerate(self.blocks):
            block_key = None if key is None else jax.random.fold_in(key, i)
            layer_prefix = None if prefix is None else (prefix[0][i], prefix[1][i])
            if self.cfg.remat == "none":
                x_BLD = block(
                    x_BLD, mask_BLS, rope, key=block_key, causal=causal, segment_ids_BL=seg_BL,
                    prefix=layer_prefix,
                )[0]  # fmt: skip
            else:
                x_BLD = _remat_block(
                    block, self.cfg.remat, x_BLD, mask_BLS, rope, block_key, seg_BL,
                    layer_prefix, causal,
                )  # fmt: skip
        return x_BLD

    def _prepend_prompt(self, x_BLD: jax.Array, positions_BL: jax.Array, segment_ids_BL):
        """(x, positions, segment ids) with prompt tuning's P virtual tokens in front (RoPE
        positions -P..-1, segment `GLOBAL_SEGMENT`); unchanged without a prompt."""
        if self.prompt is None:
            return x_BLD, positions_BL, segment_ids_BL
        virtual_PD = self.prompt().astype(x_BLD.dtype)
        (b, _, d), p = x_BLD.shape, virtual_PD.shape[0]
        x_BLD = jnp.concatenate([jnp.broadcast_to(virtual_PD, (b, p, d)), x_BLD], axis=1)
        pos_BP = jnp.broadcast_to(jnp.arange(-p, 0, dtype=jnp.int32), (b, p))
        seg_BP = jnp.full((b, p), GLOBAL_SEGMENT, jnp.int32)
        return (
            constrain(x_BLD, _RESIDUAL),
            jnp.concatenate([pos_BP, positions_BL.astype(jnp.int32)], axis=1),
            jnp.concatenate([seg_BP, segment_ids_BL.astype(jnp.int32)], axis=1),
        )

    def _embed(self, tokens_BL: jax.Array, positions_BL: jax.Array, key) -> jax.Array:
        x_BLD = self.embed(tokens_BL)
        if self.trainable_tokens is not None:
            x_BLD = x_BLD + self.trainable_tokens.input_delta(tokens_BL).astype(x_BLD.dtype)
        if self.pos_embed is not None:
            x_BLD = x_BLD + lookup(self.pos_embed[...], positions_BL, None).astype(x_BLD.dtype)
        elif self.cfg.positions == "sinusoidal":
            pos_BLD = sinusoidal_positions(positions_BL, self.cfg.d_model)
            x_BLD = x_BLD + pos_BLD.astype(x_BLD.dtype)
        emb_key = None if key is None else jax.random.fold_in(key, self.cfg.n_layers)
        return constrain(dropout(x_BLD, self.cfg.dropout, emb_key), _RESIDUAL)

    def _rope(self, positions_BL: jax.Array) -> Rope:
        if self.cfg.positions != "rope":
            return None
        cfg = self.cfg
        return rope_angles(
            positions_BL, rope_inv_freq(cfg.head_size, cfg.rope_theta, cfg.rope_scaling)
        )


def make_decoder(cfg: ModelConfig, seed: int = 0) -> Decoder:
    """A `Decoder` with params from `seed`, materialised on the default device.

    Built with eager sharding off, so it works with or without a mesh (tests, demos,
    generation on one host); sharded training builds through `nnx.eval_shape` + jit instead.
    """
    with nnx.use_eager_sharding(False):
        return Decoder(cfg, rngs=ParamKeys(seed))
