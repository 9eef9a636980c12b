"""Causal self-attention with multi-head / grouped-query / multi-query heads and a functional
KV cache.

Shape letters: B batch, L query length, S key length (cache slots), D model width, N query
heads, K key/value heads, G = N / K queries per kv head, H head size.

The attention core is one small function, `attend(q, k, v, mask)`, so the formulation can be
swapped (e.g. for `jax.nn.dot_product_attention`) without touching the module. GQA groups the
query heads as [B, L, K, G, H] against [B, K, S, H] keys, so k/v are never repeated. Keys and
values live in [B, K, S, H] layout (batch dims leading) because that is what the score and
value matmuls consume: with [B, S, K, H] XLA transposed the whole cache in every decode step.

The cache is a pytree (`KVCache`) passed in and returned, never NNX state: new keys and values
are written at slots [index, index + L) and every query attends over the whole cache, masked
by slot order and segment ids.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxllm.config import ModelConfig
from jaxllm.models.layers import apply_rope, compute_dtype, constrain, dropout, param

_QKV_AXES = ("act_batch", "act_length", "act_heads", None)
_KV_CACHE_AXES = ("act_batch", "act_heads", None, None)


@struct.dataclass
class KVCache:
    """Keys/values of every layer plus the slot bookkeeping shared by the layers.

    `k[i]`, `v[i]`: layer i's [B, K, S, H] in the compute dtype. `segment_ids` [B, S] int32:
    the segment of the token in each slot, 0 for empty or padding slots (never attended).
    `index`: int32 scalar, the next slot to write (the same for every row: the sampler
    left-pads prompts so that rows stay aligned).
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    segment_ids: jax.Array
    index: jax.Array

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, size: int) -> KVCache:
        shape = (batch, cfg.kv_heads, size, cfg.head_size)
        dtype = compute_dtype(cfg)
        return cls(
            k=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)),
            v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)),
            segment_ids=jnp.zeros((batch, size), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def size(self) -> int:
        return self.segment_ids.shape[1]


def make_mask(
    q_slot_L: jax.Array, q_seg_BL: jax.Array, kv_slot_S: jax.Array, kv_seg_BS: jax.Array
) -> jax.Array:
    """[B, L, S] bool: a query sees keys at earlier-or-equal slots of its own segment; segment
    0 (padding) sees and is seen by nothing."""
    causal_LS = kv_slot_S[None, :] <= q_slot_L[:, None]
    same_BLS = q_seg_BL[:, :, None] == kv_seg_BS[:, None, :]
    return causal_LS[None] & same_BLS & (q_seg_BL != 0)[:, :, None]


def attend(
    q_BLNH: jax.Array,
    k_BKSH: jax.Array,
    v_BKSH: jax.Array,
    mask_BLS: jax.Array,
    *,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """Softmax attention [B, L, N, H]; query head n reads kv head n // G (HF's repeat_kv order).

    Scores and softmax run in float32. Fully masked query rows (padding) output zeros, not NaN.
    """
    b, l_, n, h = q_BLNH.shape
    k = k_BKSH.shape[1]
    q_BLKGH = q_BLNH.reshape(b, l_, k, n // k, h)
    s_BKGLS = jnp.einsum("blkgh,bksh->bkgls", q_BLKGH, k_BKSH, preferred_element_type=jnp.float32)
    s_BKGLS = s_BKGLS * (1.0 / math.sqrt(h))
    mask_B11LS = mask_BLS[:, None, None]
    s_BKGLS = jnp.where(mask_B11LS, s_BKGLS, jnp.finfo(jnp.float32).min)
    p_BKGLS = jax.nn.softmax(s_BKGLS, axis=-1)
    p_BKGLS = jnp.where(mask_B11LS, p_BKGLS, 0.0)
    p_BKGLS = dropout(p_BKGLS, dropout_rate, dropout_key)
    out_BLKGH = jnp.einsum("bkgls,bksh->blkgh", p_BKGLS.astype(v_BKSH.dtype), v_BKSH)
    return out_BLKGH.reshape(b, l_, n, h)


class Attention(nnx.Module):
    """Projections, RoPE and cache handling around `attend`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, n, k, h, pd = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_size, cfg.param_dtype
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.dtype = compute_dtype(cfg)
        self.dropout_rate = cfg.dropout
        self.q = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), pd, std)
        self.k = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd, std)
        self.v = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd, std)
        self.o = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), pd, out_std)
        qkv_bias = cfg.use_bias or cfg.qkv_bias
        self.q_bias = param(rngs, (n, h), ("heads", "head_dim"), pd) if qkv_bias else None
        self.k_bias = param(rngs, (k, h), ("kv_heads", "head_dim"), pd) if qkv_bias else None
        self.v_bias = param(rngs, (k, h), ("kv_heads", "head_dim"), pd) if qkv_bias else None
        self.o_bias = param(rngs, (d,), ("embed",), pd) if cfg.use_bias else None

    def _w(self, p: nnx.Param) -> jax.Array:
        return p[...].astype(self.dtype)

    def _project(self, x_BLD: jax.Array, kernel: nnx.Param, bias: nnx.Param | None) -> jax.Array:
        y_BLNH = jnp.einsum("bld,dnh->blnh", x_BLD, self._w(kernel))
        y_BLNH = y_BLNH if bias is None else y_BLNH + self._w(bias)
        return constrain(y_BLNH, _QKV_AXES)

    def __call__(
        self,
        x_BLD: jax.Array,
        mask_BLS: jax.Array,
        rope: tuple[jax.Array, jax.Array] | None,
        *,
        kv: tuple[jax.Array, jax.Array] | None = None,
        index: jax.Array | None = None,
        key: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Returns (out_BLD, kv). Without a cache `mask_BLS` is [B, L, L]; with `kv` (this
        layer's cached k, v [B, K, S, H]) the new k/v are written at slot `index` and
        `mask_BLS` is [B, L, S] over the whole cache. `key` enables dropout."""
        q_BLNH = self._project(x_BLD, self.q, self.q_bias)
        k_BLKH = self._project(x_BLD, self.k, self.k_bias)
        v_BLKH = self._project(x_BLD, self.v, self.v_bias)
        if rope is not None:
            q_BLNH, k_BLKH = apply_rope(q_BLNH, rope), apply_rope(k_BLKH, rope)
        k_BKSH, v_BKSH = jnp.swapaxes(k_BLKH, 1, 2), jnp.swapaxes(v_BLKH, 1, 2)
        if kv is not None:
            start = (0, 0, index, 0)
            k_BKSH = jax.lax.dynamic_update_slice(kv[0], k_BKSH.astype(kv[0].dtype), start)
            v_BKSH = jax.lax.dynamic_update_slice(kv[1], v_BKSH.astype(kv[1].dtype), start)
            k_BKSH = constrain(k_BKSH, _KV_CACHE_AXES)
            v_BKSH = constrain(v_BKSH, _KV_CACHE_AXES)
            kv = (k_BKSH, v_BKSH)
        keys = (None, None) if key is None else jax.random.split(key)
        out_BLNH = attend(
            q_BLNH, k_BKSH, v_BKSH, mask_BLS, dropout_rate=self.dropout_rate, dropout_key=keys[0]
        )
        out_BLD = jnp.einsum("blnh,nhd->bld", out_BLNH, self._w(self.o))
        if self.o_bias is not None:
            out_BLD = out_BLD + self._w(self.o_bias)
        return dropout(out_BLD, self.dropout_rate, keys[1]), kv
