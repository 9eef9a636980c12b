"""Causal self-attention with multi-head / grouped-query / multi-query heads and a functional
KV cache.

Shape letters: B batch, L query length, S key length (cache slots), D model width, N query
heads, K key/value heads, G = N / K queries per kv head, H head size.

The attention core is one small function, `attend(q, k, v, mask)`, so the formulation can be
swapped without touching the module. GQA groups the query heads as [B, K, G, L, H] against
[B, K, S, H] keys, so k/v are never repeated. Keys and values live in [B, K, S, H] layout
(batch dims leading) because that is what the score and value matmuls consume: with
[B, S, K, H] XLA transposed the whole cache in every decode step.

`attend` has its own backward pass (`_core`, no dropout): the softmax gradient uses
rowsum(dP * P) = rowsum(dO * O) (FlashAttention's identity), a reduction over [.., L, H]
instead of the [.., L, S] probabilities, and the two transposed-operand gradient matmuls
transpose q and dO ([.., L, H]) rather than the [.., L, S] matrices. With `causal=True` (the
decoder's training/scoring path, whose mask never lets query i see key j > i) the queries run
in blocks that skip the key blocks that are masked out entirely. jax.nn.dot_product_attention
(implementation="xla") measured no faster on CPU than the einsum core and cannot zero padded
rows.

The cache is a pytree (`KVCache`) passed in and returned, never NNX state: new keys and values
are written at slots [index, index + L) and every query attends over the whole cache, masked
by slot order and segment ids.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxllm.config import ModelConfig
from jaxllm.models.kernels import ATTENTION, resolve_attention
from jaxllm.models.layers import apply_rope, compute_dtype, constrain, dropout, param, project
from jaxllm.models.target import on_cpu

_QKV_AXES = ("act_batch", "act_length", "act_heads", None)
_KV_CACHE_AXES = ("act_batch", "act_heads", None, None)
GLOBAL_SEGMENT = -1  # slots every real query sees: PEFT prefixes and virtual tokens
Prefix = tuple[jax.Array, jax.Array] | None  # prefix-tuning keys, values [(N,) P, K, H]


@struct.dataclass
class KVCache:
    """Keys/values of every layer plus the slot bookkeeping shared by the layers.

    `k[i]`, `v[i]`: layer i's [B, K, S, H] in the compute dtype: a tuple of per-layer arrays,
    or for a scanned model (`cfg.scan_layers`) one stacked [n_layers, B, K, S, H] array each. `segment_ids` [B, S] int32:
    the segment of the token in each slot, 0 for empty or padding slots (never attended).
    `index`: int32 scalar, the next slot to write (the same for every row: the sampler
    left-pads prompts so that rows stay aligned), or [B] int32, each row's own next slot
    (the serving engine's slots, each at its own length: `with_row_index`).
    """

    k: tuple[jax.Array, ...] | jax.Array
    v: tuple[jax.Array, ...] | jax.Array
    segment_ids: jax.Array
    index: jax.Array

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, size: int) -> KVCache:
        shape = (batch, cfg.kv_heads, size, cfg.head_size)
        dtype = compute_dtype(cfg)

        def zeros() -> tuple[jax.Array, ...] | jax.Array:  # k and v: distinct buffers
            if cfg.scan_layers:
                return jnp.zeros((cfg.n_layers, *shape), dtype)
            return tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))

        return cls(
            k=zeros(),
            v=zeros(),
            segment_ids=jnp.zeros((batch, size), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def size(self) -> int:
        return self.segment_ids.shape[1]

    def with_row_index(self) -> KVCache:
        """The cache with a per-row write index [B] (each row starting where all are now)."""
        b = self.segment_ids.shape[0]
        return self.replace(index=jnp.broadcast_to(self.index, (b,)).astype(jnp.int32))

    def with_prefix(self, k_NPKH: jax.Array, v_NPKH: jax.Array) -> KVCache:
        """The cache with prefix-tuning keys/values (N layers, P slots) written at the next
        P slots, segment `GLOBAL_SEGMENT`: every later query sees them."""
        n, p, kh, h = k_NPKH.shape
        b = self.segment_ids.shape[0]

        def put(cache, x_NPKH: jax.Array):
            x_NBKPH = jnp.broadcast_to(jnp.swapaxes(x_NPKH, 1, 2)[:, None], (n, b, kh, p, h))
            if not isinstance(cache, tuple):  # stacked layers
                x_NBKPH = x_NBKPH.astype(cache.dtype)
                return jax.lax.dynamic_update_slice(cache, x_NBKPH, (0, 0, 0, self.index, 0))
            at = (0, 0, self.index, 0)
            return tuple(
                jax.lax.dynamic_update_slice(c, x_NBKPH[i].astype(c.dtype), at)
                for i, c in enumerate(cache)
            )

        seg_BP = jnp.full((b, p), GLOBAL_SEGMENT, jnp.int32)
        return KVCache(
            k=put(self.k, k_NPKH),
            v=put(self.v, v_NPKH),
            segment_ids=jax.lax.dynamic_update_slice(self.segment_ids, seg_BP, (0, self.index)),
            index=self.index + p,
        )


def write_slots(cache_BKSH: jax.Array, new_BKLH: jax.Array, index: jax.Array) -> jax.Array:
    """`new` written at slots [index, index + L): one slice for a scalar index, or each row
    at its own index [B] (rows at different lengths)."""
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice(cache_BKSH, new_BKLH, (0, 0, index, 0))
    row = lambda c, x, i: jax.lax.dynamic_update_slice(c, x, (0, i, 0))  # noqa: E731
    return jax.vmap(row)(cache_BKSH, new_BKLH, index)


def make_mask(
    q_slot_L: jax.Array, q_seg_BL: jax.Array, kv_slot_S: jax.Array, kv_seg_BS: jax.Array
) -> jax.Array:
    """[B, L, S] bool: a query sees keys at earlier-or-equal slots of its own segment or of
    `GLOBAL_SEGMENT` (a prefix before slot 0, seen by every document of a packed row);
    segment 0 (padding) sees and is seen by nothing. `q_slot_L` may be [B, L] (per-row slots)."""
    causal_LS = kv_slot_S[None, :] <= q_slot_L[..., None]
    same_BLS = q_seg_BL[:, :, None] == kv_seg_BS[:, None, :]
    same_BLS = same_BLS | (kv_seg_BS == GLOBAL_SEGMENT)[:, None, :]
    causal_BLS = causal_LS if causal_LS.ndim == 3 else causal_LS[None]
    return causal_BLS & same_BLS & (q_seg_BL != 0)[:, :, None]


def prefixed_mask(segment_ids_BL: jax.Array, n_prefix: int) -> jax.Array:
    """[B, L, P + L] causal mask of L tokens after `n_prefix` (P) global slots, which every
    real token sees (prefix tuning's keys/values). P = 0: the plain causal mask."""
    b, l_ = segment_ids_BL.shape
    kv_seg_BS = jnp.concatenate(
        [jnp.full((b, n_prefix), GLOBAL_SEGMENT, jnp.int32), segment_ids_BL], axis=1
    )
    slots_S = jnp.arange(n_prefix + l_)
    return make_mask(slots_S[n_prefix:], segment_ids_BL, slots_S, kv_seg_BS)


def _with_prefix(x_BKLH: jax.Array, p_PKH: jax.Array) -> jax.Array:
    """Prefix keys or values [P, K, H] (one layer's) put before slot 0 of every row."""
    b, k, _, h = x_BKLH.shape
    p_BKPH = jnp.broadcast_to(jnp.swapaxes(p_PKH, 0, 1)[None], (b, k, p_PKH.shape[0], h))
    return jnp.concatenate([p_BKPH.astype(x_BKLH.dtype), x_BKLH], axis=2)


_NEG = float(jnp.finfo(jnp.float32).min)


def _barrier(a: jax.Array) -> jax.Array:
    return jax.lax.optimization_barrier(a) if on_cpu() else a


def _T(a: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """A transpose written out on CPU (XLA may not fold it into the next matmul as a
    transposed operand, which YNNPACK on CPU does not take)."""
    return _barrier(jnp.transpose(a, axes))


def _probs(q_BKGLH: jax.Array, k_BKSH: jax.Array, mask_BLS: jax.Array) -> jax.Array:
    """Softmax probabilities [B, K, G, L, S] in float32; fully masked query rows are zeros."""
    s_BKGLS = jnp.einsum("bkglh,bksh->bkgls", q_BKGLH, k_BKSH, preferred_element_type=jnp.float32)
    s_BKGLS = s_BKGLS * (1.0 / math.sqrt(q_BKGLH.shape[-1]))
    s_BKGLS = jnp.where(mask_BLS[:, None, None], s_BKGLS, _NEG)
    p_BKGLS = jax.nn.softmax(s_BKGLS, axis=-1)
    # A row with any visible key has exp(min - max) == 0 at its masked keys already, so
    # only rows with none (padding queries) need zeroing: a [B, L] row mask, not [B, L, S].
    row_B11L1 = jnp.any(mask_BLS, axis=-1)[:, None, None, :, None]
    return jnp.where(row_B11L1, p_BKGLS, 0.0)


@jax.custom_vjp
def _core(q_BKGLH, k_BKSH, v_BKSH, mask_BLS):
    p_BKGLS = _probs(q_BKGLH, k_BKSH, mask_BLS)
    return jnp.einsum("bkgls,bksh->bkglh", p_BKGLS.astype(v_BKSH.dtype), v_BKSH)


def _core_fwd(q_BKGLH, k_BKSH, v_BKSH, mask_BLS):
    p_BKGLS = _probs(q_BKGLH, k_BKSH, mask_BLS)
    o_BKGLH = jnp.einsum("bkgls,bksh->bkglh", p_BKGLS.astype(v_BKSH.dtype), v_BKSH)
    return o_BKGLH, (q_BKGLH, k_BKSH, v_BKSH, mask_BLS, p_BKGLS, o_BKGLH)


def _core_bwd(res, do_BKGLH):
    q_BKGLH, k_BKSH, v_BKSH, mask_BLS, p_BKGLS, o_BKGLH = res
    do_BKGLH = do_BKGLH.astype(v_BKSH.dtype)
    # dV = P^T dO and dK = dS^T Q contract over (g, l): transpose dO and Q, not P and dS.
    doT_BKHGL = _T(do_BKGLH, (0, 1, 4, 2, 3))
    dvT_BKHS = jnp.einsum("bkhgl,bkgls->bkhs", doT_BKHGL, p_BKGLS.astype(do_BKGLH.dtype))
    dp_BKGLS = jnp.einsum("bkglh,bksh->bkgls", do_BKGLH, v_BKSH, preferred_element_type=jnp.float32)
    delta_BKGL1 = jnp.sum(
        do_BKGLH.astype(jnp.float32) * o_BKGLH.astype(jnp.float32), axis=-1, keepdims=True
    )
    scale = 1.0 / math.sqrt(q_BKGLH.shape[-1])
    ds_BKGLS = (p_BKGLS * (dp_BKGLS - delta_BKGL1) * scale).astype(q_BKGLH.dtype)
    dq_BKGLH = jnp.einsum("bkgls,bksh->bkglh", ds_BKGLS, k_BKSH)
    qT_BKHGL = _T(q_BKGLH, (0, 1, 4, 2, 3))
    dkT_BKHS = jnp.einsum("bkhgl,bkgls->bkhs", qT_BKHGL, ds_BKGLS)
    # ... and the products come out transposed: the barrier keeps XLA from folding the swap
    # back into the matmul (as an Eigen dot with a transposed operand, 2x slower).
    dk_BKSH = jnp.swapaxes(_barrier(dkT_BKHS), 2, 3).astype(k_BKSH.dtype)
    dv_BKSH = jnp.swapaxes(_barrier(dvT_BKHS), 2, 3).astype(v_BKSH.dtype)
    return dq_BKGLH, dk_BKSH, dv_BKSH, np.zeros(mask_BLS.shape, jax.dtypes.float0)


_core.defvjp(_core_fwd, _core_bwd)


def _causal_blocks(length: int) -> int:
    """Query blocks for the causal path on CPU: blocks of 128+ queries (2 blocks skip 1/4
    of the score matrix; more, smaller blocks measured no faster on a 2-core CPU). Other
    backends run one block (accelerators take the fused kernels, models/kernels.py)."""
    return 2 if on_cpu() and length >= 256 and length % 2 == 0 else 1


def _attend_with_dropout(q_BKGLH, k_BKSH, v_BKSH, mask_BLS, rate, key):
    p_BKGLS = dropout(_probs(q_BKGLH, k_BKSH, mask_BLS), rate, key)
    return jnp.einsum("bkgls,bksh->bkglh", p_BKGLS.astype(v_BKSH.dtype), v_BKSH)


def attend(
    q_BLNH: jax.Array,
    k_BKSH: jax.Array,
    v_BKSH: jax.Array,
    mask_BLS: jax.Array,
    *,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
    causal: bool = False,
) -> jax.Array:
    """Softmax attention [B, L, N, H]; query head n reads kv head n // G (HF's repeat_kv order).

    Scores and softmax run in float32. Fully masked query rows (padding) output zeros, not NaN.
    `causal=True` promises that query slot i is never allowed to see key slot j > i (queries
    and keys at slots 0..L-1); fully masked-out blocks are then skipped (same result, up to
    float summation order).
    """
    b, l_, n, h = q_BLNH.shape
    k = k_BKSH.shape[1]
    q_BKGLH = jnp.transpose(q_BLNH.reshape(b, l_, k, n // k, h), (0, 2, 3, 1, 4))
    if dropout_rate > 0.0 and dropout_key is not None:
        o_BKGLH = _attend_with_dropout(q_BKGLH, k_BKSH, v_BKSH, mask_BLS, dropout_rate, dropout_key)
    elif causal and k_BKSH.shape[2] == l_ and _causal_blocks(l_) > 1:
        step = l_ // _causal_blocks(l_)
        o_BKGLH = jnp.concatenate(
            [
                _core(
                    q_BKGLH[:, :, :, lo : lo + step],
                    k_BKSH[:, :, : lo + step],
                    v_BKSH[:, :, : lo + step],
                    mask_BLS[:, lo : lo + step, : lo + step],
                )
                for lo in range(0, l_, step)
            ],
            axis=3,
        )
    else:
        o_BKGLH = _core(q_BKGLH, k_BKSH, v_BKSH, mask_BLS)
    return jnp.transpose(o_BKGLH, (0, 3, 1, 2, 4)).reshape(b, l_, n, h)


class Attention(nnx.Module):
    """Projections, RoPE and cache handling around `attend`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, n, k, h, pd = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_size, cfg.param_dtype
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.dtype = compute_dtype(cfg)
        self.dropout_rate = cfg.dropout
        self.kernel = resolve_attention(cfg)
        self.max_docs = cfg.attention_max_docs
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

    def _project(self, x_BLD: jax.Array, name: str, lora_keys) -> jax.Array:
        key = None if lora_keys is None else lora_keys[("q", "k", "v").index(name)]
        y_BLNH = project(self, name, x_BLD, key=key)
        bias = getattr(self, f"{name}_bias")
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
        causal: bool = False,
        segment_ids_BL: jax.Array | None = None,
        prefix: Prefix = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Returns (out_BLD, kv). Without a cache `mask_BLS` is [B, L, L] ([B, L, P + L] with
        `prefix`, this layer's prefix-tuning keys and values [P, K, H] put before slot 0;
        with a cache the prefix already sits in its first slots); with `kv` (this
        layer's cached k, v [B, K, S, H]) the new k/v are written at slot `index` and
        `mask_BLS` is [B, L, S] over the whole cache. `key` enables dropout. `causal=True`
        (no cache only) promises that the mask is the causal one within the segments
        `segment_ids_BL` (None: one segment per row): a fused kernel then runs instead of
        `attend` when `model.attention` picked one (models/kernels.py)."""
        # Three matmuls: one fused [D, N + 2K, H] projection measured the same on CPU.
        # LoRA dropout keys (only used when adapters with dropout are attached)
        lora_keys = None if key is None else jax.random.split(jax.random.fold_in(key, 2), 4)
        q_BLNH = self._project(x_BLD, "q", lora_keys)
        k_BLKH = self._project(x_BLD, "k", lora_keys)
        v_BLKH = self._project(x_BLD, "v", lora_keys)
        if rope is not None:
            q_BLNH, k_BLKH = apply_rope(q_BLNH, rope), apply_rope(k_BLKH, rope)
        chex.assert_rank([q_BLNH, k_BLKH, v_BLKH], 4)
        chex.assert_equal_shape([k_BLKH, v_BLKH])
        if causal and kv is None and prefix is None and self.kernel != "xla":
            opts = {"max_runs": self.max_docs} if self.kernel == "cudnn" else {}
            out_BLNH = ATTENTION[self.kernel](q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, **opts)
            return self._output(out_BLNH, key, lora_keys), None
        k_BKSH, v_BKSH = jnp.swapaxes(k_BLKH, 1, 2), jnp.swapaxes(v_BLKH, 1, 2)
        if prefix is not None and kv is None:
            k_BKSH, v_BKSH = _with_prefix(k_BKSH, prefix[0]), _with_prefix(v_BKSH, prefix[1])
        if kv is not None:
            k_BKSH = write_slots(kv[0], k_BKSH.astype(kv[0].dtype), index)
            v_BKSH = write_slots(kv[1], v_BKSH.astype(kv[1].dtype), index)
            k_BKSH = constrain(k_BKSH, _KV_CACHE_AXES)
            v_BKSH = constrain(v_BKSH, _KV_CACHE_AXES)
            kv = (k_BKSH, v_BKSH)
        keys = (None, None) if key is None else jax.random.split(key)
        out_BLNH = attend(
            q_BLNH, k_BKSH, v_BKSH, mask_BLS, dropout_rate=self.dropout_rate,
            dropout_key=keys[0], causal=causal and kv is None,
        )  # fmt: skip
        return self._output(out_BLNH, key, lora_keys), kv

    def _output(self, out_BLNH: jax.Array, key, lora_keys) -> jax.Array:
        """The output projection (+ bias) and the residual dropout."""
        out_BLD = project(self, "o", out_BLNH, 2, key=None if key is None else lora_keys[3])
        if self.o_bias is not None:
            out_BLD = out_BLD + self._w(self.o_bias)
        drop_key = None if key is None else jax.random.split(key)[1]
        return dropout(out_BLD, self.dropout_rate, drop_key)
