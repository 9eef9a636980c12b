"""Pallas splash attention (TPU) for the causal no-cache path, with packed-document segments.

The kernel (jax.experimental.pallas.ops.tpu.splash_attention) runs one example at a time on
[heads, L, H] blocks, skips the key blocks the causal mask hides, and takes GQA key/value
heads as they are. It is a custom call XLA cannot partition, so under an active mesh it runs
inside `shard_map`: each device takes its rows (the `act_batch` axes) and, with tensor
parallelism, its heads. The kernel's blocks are multiples of 128 positions, so a row whose
length is not is padded at its end (causality hides the padded keys from every real query)
and the padding's outputs dropped. Which form runs is chosen where the program is lowered
(`lax.platform_dependent`): the compiled Mosaic kernel for a TPU, Pallas's interpret mode
for anything else (tests on CPU), so a TPU program lowered ahead of time on another machine
(`jax.export`) holds the real kernel.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec

from jaxllm.sharding.rules import active_rules

_LANES = 128  # the kernel's block sizes are multiples of this


def _block_sizes(length: int) -> sk.BlockSizes:
    """Blocks of 512 positions, or the largest of 256 and 128 that divides `length` (a
    multiple of 128)."""
    b = next(size for size in (512, 256, _LANES) if length % size == 0)
    return sk.BlockSizes(
        block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
        block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b,
    )  # fmt: skip


def _kernel(q_BNLH, k_BKLH, v_BKLH, seg_BL, *, interpret: bool):
    """Splash attention on [heads, L, H] blocks, one example at a time; L a multiple of 128."""
    _, n, length, _ = q_BNLH.shape
    mask = sm.MultiHeadMask([sm.CausalMask((length, length)) for _ in range(n)])
    kernel = sk.make_splash_mha(
        mask, head_shards=1, q_seq_shards=1, block_sizes=_block_sizes(length),
        interpret=interpret,
    )  # fmt: skip
    if seg_BL is None:
        return jax.vmap(kernel)(q_BNLH, k_BKLH, v_BKLH)
    ids = sk.SegmentIds(q=seg_BL, kv=seg_BL)
    return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=s))(q_BNLH, k_BKLH, v_BKLH, ids)


def _local(q_BLNH, k_BLKH, v_BLKH, seg_BL):
    """The kernel on this device's rows and heads."""
    _, length, _, h = q_BLNH.shape
    pad = -length % _LANES
    q_BNLH = jnp.swapaxes(q_BLNH * jnp.asarray(1.0 / math.sqrt(h), q_BLNH.dtype), 1, 2)
    k_BKLH, v_BKLH = jnp.swapaxes(k_BLKH, 1, 2), jnp.swapaxes(v_BLKH, 1, 2)
    if pad:
        widths = ((0, 0), (0, 0), (0, pad), (0, 0))
        q_BNLH, k_BKLH, v_BKLH = (jnp.pad(x, widths) for x in (q_BNLH, k_BKLH, v_BKLH))
        seg_BL = None if seg_BL is None else jnp.pad(seg_BL, ((0, 0), (0, pad)))
    out_BNLH = jax.lax.platform_dependent(
        q_BNLH, k_BKLH, v_BKLH, seg_BL,
        tpu=partial(_kernel, interpret=False), default=partial(_kernel, interpret=True),
    )  # fmt: skip
    return jnp.swapaxes(out_BNLH[:, :, :length], 1, 2).astype(q_BLNH.dtype)


def splash_attention(
    q_BLNH: jax.Array, k_BLKH: jax.Array, v_BLKH: jax.Array, segment_ids_BL: jax.Array | None
) -> jax.Array:
    """Causal attention within segments [B, L, N, H] (see models/kernels.py)."""
    active = active_rules()
    if active is None:
        return _local(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL)
    mesh, table = active
    batch, heads = table.get("act_batch"), table.get("act_heads")
    qkv = PartitionSpec(batch, None, heads, None)
    seg = PartitionSpec(batch, None)
    if segment_ids_BL is None:
        fn = jax.shard_map(
            lambda q, k, v: _local(q, k, v, None), mesh=mesh, in_specs=(qkv, qkv, qkv),
            out_specs=qkv, check_vma=False,
        )  # fmt: skip
        return fn(q_BLNH, k_BLKH, v_BLKH)
    fn = jax.shard_map(
        _local, mesh=mesh, in_specs=(qkv, qkv, qkv, seg), out_specs=qkv, check_vma=False
    )
    return fn(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL)
