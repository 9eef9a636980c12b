"""Pallas splash attention (TPU) for the causal no-cache path, with packed-document segments.

The kernel (jax.experimental.pallas.ops.tpu.splash_attention) runs one example at a time on
[heads, L, H] blocks, skips the key blocks the causal mask hides, and takes GQA key/value
heads as they are. It is a custom call XLA cannot partition, so under an active mesh it runs
inside `shard_map`: each device takes its rows (the `act_batch` axes) and, with tensor
parallelism, its heads. Off TPU it runs in Pallas's interpret mode (tests on CPU).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec

from jaxllm.sharding.rules import active_rules


def _block_sizes(length: int) -> sk.BlockSizes:
    b = min(512, length)
    return sk.BlockSizes(
        block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
        block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b,
    )  # fmt: skip


def _local(q_BLNH, k_BLKH, v_BLKH, seg_BL):
    """The kernel on this device's rows and heads."""
    _, length, n, h = q_BLNH.shape
    mask = sm.MultiHeadMask([sm.CausalMask((length, length)) for _ in range(n)])
    kernel = sk.make_splash_mha(
        mask, head_shards=1, q_seq_shards=1, block_sizes=_block_sizes(length),
        interpret=jax.default_backend() != "tpu",
    )  # fmt: skip
    q_BNLH = jnp.swapaxes(q_BLNH * jnp.asarray(1.0 / math.sqrt(h), q_BLNH.dtype), 1, 2)
    k_BKLH, v_BKLH = jnp.swapaxes(k_BLKH, 1, 2), jnp.swapaxes(v_BLKH, 1, 2)
    if seg_BL is None:
        out_BNLH = jax.vmap(kernel)(q_BNLH, k_BKLH, v_BKLH)
    else:
        ids = sk.SegmentIds(q=seg_BL, kv=seg_BL)
        out_BNLH = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=s))(
            q_BNLH, k_BKLH, v_BKLH, ids
        )
    return jnp.swapaxes(out_BNLH, 1, 2).astype(q_BLNH.dtype)


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
