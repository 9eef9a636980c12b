"""Heads that later stages put on a backbone. Decoder: a scalar per token (a PPO critic's
value) or per sequence (a reward model, read at the last real token). Encoder (BERT): the
masked-LM head tied to the word embeddings, next-sentence prediction and a classifier on the
pooled `[CLS]`.

`HeadParam` marks a head's weights: a subclass of `nnx.Param`, so full fine-tuning trains it
like any weight, and under PEFT the trainable filter `nnx.Any(<the method's variable type>,
HeadParam)` trains it next to the method's variables (a new head must learn, whatever else
is frozen).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.models.decoder import Decoder
from jaxllm.models.encoder import Encoder


class HeadParam(nnx.Param):
    """A weight of a task head on top of a decoder."""


class ScalarHead(nnx.Module):
    """`x_BLD → s_BL` (float32): a linear map of the final-norm features to one number."""

    def __init__(self, d_model: int, *, rngs: nnx.Rngs, std: float = 0.0):
        init = nnx.initializers.normal(std) if std > 0 else nnx.initializers.zeros
        w = init(rngs.params(), (d_model,), jnp.float32)
        self.kernel = HeadParam(w, out_sharding=("embed",))
        self.bias = HeadParam(jnp.zeros((), jnp.float32))

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        x = x_BLD.astype(jnp.float32)
        return jnp.einsum("bld,d->bl", x, self.kernel[...]) + self.bias[...]


class ScalarModel(nnx.Module):
    """A decoder with a scalar head: `model(tokens, ...) -> s_BL`, one number per position.
    The backbone stays reachable as `.decoder` (module paths `decoder.blocks.0.attn.q`)."""

    def __init__(self, decoder: Decoder, *, rngs: nnx.Rngs, std: float = 0.0):
        self.decoder = decoder
        self.head = ScalarHead(decoder.cfg.d_model, rngs=rngs, std=std)

    def __call__(self, tokens_BL: jax.Array, **kwargs) -> jax.Array:
        return self.head(self.decoder.features(tokens_BL, **kwargs))


def with_scalar_head(decoder: nnx.Module, rngs: nnx.Rngs) -> ScalarModel:
    """The `wrap` that `init_from_checkpoint` / `load_checkpoint_model` take for reward and
    value models (the head starts at zero: every score 0 before training)."""
    return ScalarModel(decoder, rngs=rngs)


def last_token_index(segment_ids_BL: jax.Array) -> jax.Array:
    """[B] index of each row's last real token (segment id > 0; 0 for an empty row)."""
    length = segment_ids_BL.shape[1]
    real_BL = segment_ids_BL > 0
    idx_BL = jnp.where(real_BL, jnp.arange(length)[None, :], -1)
    return jnp.maximum(jnp.max(idx_BL, axis=1), 0)


# ------------------------------------------------------------------ encoder heads (BERT)


def _head_param(rngs: nnx.Rngs, shape: tuple[int, ...], names, std: float) -> HeadParam:
    init = nnx.initializers.normal(std) if std > 0 else nnx.initializers.zeros
    return HeadParam(init(rngs.params(), shape, jnp.float32), out_sharding=names)


class MLMHead(nnx.Module):
    """BERT's masked-LM head: dense + GELU + LayerNorm, then the word embedding (tied) and a
    per-token bias: features [..., D] → logits [..., V] in float32."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d = cfg.d_model
        self.eps = cfg.norm_eps
        self.kernel = _head_param(rngs, (d, d), ("embed", None), cfg.init_std)
        self.bias = _head_param(rngs, (d,), (None,), 0.0)
        self.ln_scale = HeadParam(jnp.ones((d,), jnp.float32), out_sharding=(None,))
        self.ln_bias = _head_param(rngs, (d,), (None,), 0.0)
        self.out_bias = _head_param(rngs, (cfg.vocab_size,), ("vocab",), 0.0)

    def __call__(self, x_ND: jax.Array, embedding_VD: jax.Array) -> jax.Array:
        h = jax.nn.gelu(x_ND.astype(jnp.float32) @ self.kernel[...] + self.bias[...], False)
        h = h - jnp.mean(h, axis=-1, keepdims=True)
        h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + self.eps)
        h = h * self.ln_scale[...] + self.ln_bias[...]
        return h @ embedding_VD.astype(jnp.float32).T + self.out_bias[...]


class PooledHead(nnx.Module):
    """A linear map of the pooled `[CLS]` features to `n` logits (NSP: 2; a classifier: one
    per label), after dropout when training."""

    def __init__(self, d_model: int, n: int, *, rngs: nnx.Rngs, std: float = 0.02):
        self.kernel = _head_param(rngs, (d_model, n), ("embed", None), std)
        self.bias = _head_param(rngs, (n,), (None,), 0.0)

    def __call__(self, pooled_BD: jax.Array, rate: float = 0.0, key=None) -> jax.Array:
        from jaxllm.models.layers import dropout

        return dropout(pooled_BD, rate, key) @ self.kernel[...] + self.bias[...]


class BertPretrainModel(nnx.Module):
    """Encoder + MLM head + NSP head (`stage: mlm`); the backbone is `.encoder`."""

    def __init__(self, encoder: Encoder, *, rngs: nnx.Rngs):
        self.encoder = encoder
        self.mlm = MLMHead(encoder.cfg, rngs=rngs)
        self.nsp = PooledHead(encoder.cfg.d_model, 2, rngs=rngs, std=encoder.cfg.init_std)

    def __call__(self, tokens_BL: jax.Array, mask_positions_BM: jax.Array, **kw):
        """(MLM logits [B, M, V] at the gathered positions, NSP logits [B, 2])."""
        x_BLD = self.encoder(tokens_BL, **kw)
        picked_BMD = jnp.take_along_axis(x_BLD, mask_positions_BM[..., None], axis=1)
        mlm_BMV = self.mlm(picked_BMD, self.encoder.embed.embedding[...])
        return mlm_BMV, self.nsp(self.encoder.pooled(x_BLD))


class ElectraPretrainModel(nnx.Module):
    """ELECTRA (Clark et al. 2020): a small generator (`.generator`, an encoder with the MLM
    head) fills the chosen positions, and the discriminator — the backbone, `.encoder`, what
    later stages read — tells every token of that row as original or replaced (`rtd_*`: dense
    + GELU + a scalar per token). The generator reads through the discriminator's embeddings
    (the word and token-type tables, and the position table when positions are learned, as
    the paper shares them) and its MLM head is tied to the word embeddings."""

    def __init__(self, encoder: Encoder, generator: Encoder, *, rngs: nnx.Rngs):
        generator.embed = encoder.embed
        generator.type_embed = encoder.type_embed
        if encoder.pos_embed is not None:
            generator.pos_embed = encoder.pos_embed
        self.encoder = encoder
        self.generator = generator
        self.mlm = MLMHead(generator.cfg, rngs=rngs)
        d, std = encoder.cfg.d_model, encoder.cfg.init_std
        self.rtd_kernel = _head_param(rngs, (d, d), ("embed", None), std)
        self.rtd_bias = _head_param(rngs, (d,), (None,), 0.0)
        self.rtd_out = _head_param(rngs, (d,), ("embed",), std)

    def generate(self, tokens_BL: jax.Array, mask_positions_BM: jax.Array, **kw) -> jax.Array:
        """The generator's MLM logits [B, M, V] (float32) at the chosen positions."""
        x_BLD = self.generator(tokens_BL, **kw)
        picked_BMD = jnp.take_along_axis(x_BLD, mask_positions_BM[..., None], axis=1)
        return self.mlm(picked_BMD, self.encoder.embed.embedding[...])

    def discriminate(self, tokens_BL: jax.Array, **kw) -> jax.Array:
        """Replaced-token logits [B, L] (float32): > 0 says "replaced"."""
        x = self.encoder(tokens_BL, **kw).astype(jnp.float32)
        h = jax.nn.gelu(x @ self.rtd_kernel[...] + self.rtd_bias[...], approximate=False)
        return h @ self.rtd_out[...]


POOLINGS = ("cls", "mean")


def mean_pool(x_BLD: jax.Array, segment_ids_BL: jax.Array | None) -> jax.Array:
    """[B, D] float32 mean of the features over each row's real tokens (segment id > 0,
    `[CLS]` and `[SEP]` included, as Sentence-BERT's mean over the attention mask); every
    position when `segment_ids_BL` is None; an all-padding row gives zeros."""
    x_BLD = x_BLD.astype(jnp.float32)
    if segment_ids_BL is None:
        return jnp.mean(x_BLD, axis=1)
    real_BL = (segment_ids_BL > 0).astype(jnp.float32)
    total_BD = jnp.einsum("bld,bl->bd", x_BLD, real_BL)
    return total_BD / jnp.maximum(jnp.sum(real_BL, axis=1), 1.0)[:, None]


class ClassifierModel(nnx.Module):
    """Encoder + a classification head (`stage: classify`) on the pooled `[CLS]` (`pooling:
    cls`, BERT's: the pooler's tanh dense, trained by NSP in pretraining) or on the mean of
    the final token features (`mean`: the pooler is not used). Pooling has no weights of its
    own, so either reads the same checkpoint."""

    def __init__(
        self, encoder: Encoder, num_labels: int, *, rngs: nnx.Rngs, pooling: str = "cls"
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling: one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.encoder = encoder
        self.pooling = pooling
        self.head = PooledHead(encoder.cfg.d_model, num_labels, rngs=rngs, std=encoder.cfg.init_std)

    def __call__(self, tokens_BL: jax.Array, *, deterministic: bool = True, key=None, **kw):
        """Logits [B, num_labels] in float32."""
        x_BLD = self.encoder(tokens_BL, deterministic=deterministic, key=key, **kw)
        # the encoder folds in 0..n_layers (blocks, embeddings): the head's key is the next
        n = self.encoder.cfg.n_layers + 1
        head_key = None if key is None or deterministic else jax.random.fold_in(key, n)
        if self.pooling == "mean":
            pooled_BD = mean_pool(x_BLD, kw.get("segment_ids_BL"))
        else:
            pooled_BD = self.encoder.pooled(x_BLD)
        return self.head(pooled_BD, self.encoder.cfg.dropout, head_key)
