"""Attention kernels for the causal no-cache path (training, scoring), looked up by name.

`model.attention` picks one: `xla` (the einsum core in `attention.attend`, every backend),
`cudnn` (cuDNN's fused flash attention through XLA, NVIDIA GPUs, bf16/fp16), `splash` (the
Pallas splash-attention kernel, TPUs), or `auto`: cudnn on a GPU and splash on a TPU when the
compute dtype allows, else xla. The KV-cache path (prefill, decode) always runs `attend`.

Every kernel takes q [B, L, N, H], k and v [B, L, K, H] (GQA: N a multiple of K) and
`segment_ids_BL` (None: one causal sequence per row), and returns [B, L, N, H]. A query
sees the keys at earlier-or-equal positions of its own segment. Packed rows (several
documents per row, segment 0 = padding) go to cuDNN in its packed ("THD") layout: each run
of equal segment ids is one sequence with its own offset and length (`segment_runs`), so
documents never attend to each other. A padding run then attends within itself instead of
giving zeros as the xla path does; its outputs are masked out of every loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.errors import ConfigError
from jaxllm.models.target import target_platform

AttentionFn = Callable[..., jax.Array]
KERNELS = ("xla", "cudnn", "splash")
_LOW_PRECISION = ("bfloat16", "float16")
_KEY = "config key 'model.attention':"


def segment_runs(segment_ids_BL: jax.Array, max_runs: int) -> tuple[jax.Array, jax.Array]:
    """(lengths [B, M], offsets [B, M + 1]) of the runs of equal ids in each row, M =
    `max_runs`, unused entries -1: cuDNN's packed-sequence description (`q_seqlen`,
    `q_offsets`). A row with more than M runs has its last ones merged into its M-th run
    (those documents then see each other, as in unmasked training): cuDNN's workspace grows
    with B x M x L, so M stays small (`model.attention_max_docs`)."""
    b, length = segment_ids_BL.shape
    pos_L = jnp.arange(length, dtype=jnp.int32)
    starts_BL = jnp.concatenate(
        [jnp.ones((b, 1), bool), segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]], axis=1
    )
    run_BL = jnp.minimum(jnp.cumsum(starts_BL, axis=1, dtype=jnp.int32) - 1, max_runs - 1)
    rows_BL = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, length))
    lengths = jnp.zeros((b, max_runs), jnp.int32).at[rows_BL, run_BL].add(1, mode="drop")
    n_runs_B1 = run_BL[:, -1:] + 1
    lengths = jnp.where(jnp.arange(max_runs) < n_runs_B1, lengths, -1)
    big = jnp.int32(length)
    offsets = (
        jnp.full((b, max_runs + 1), big)
        .at[rows_BL, run_BL]
        .min(jnp.broadcast_to(pos_L, (b, length)), mode="drop")
    )
    offsets = jnp.where(jnp.arange(max_runs + 1) < n_runs_B1, offsets, -1)
    return lengths, offsets


def _xla(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL):
    from jaxllm.models.attention import attend, make_mask

    b, length = q_BLNH.shape[:2]
    seg_BL = jnp.ones((b, length), jnp.int32) if segment_ids_BL is None else segment_ids_BL
    slots_L = jnp.arange(length)
    mask_BLL = make_mask(slots_L, seg_BL, slots_L, seg_BL)
    k_BKSH, v_BKSH = jnp.swapaxes(k_BLKH, 1, 2), jnp.swapaxes(v_BLKH, 1, 2)
    return attend(q_BLNH, k_BKSH, v_BKSH, mask_BLL, causal=True)


def _cudnn(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, max_runs: int = 16):
    scale = 1.0 / math.sqrt(q_BLNH.shape[-1])
    if segment_ids_BL is None:
        return jax.nn.dot_product_attention(
            q_BLNH, k_BLKH, v_BLKH, scale=scale, is_causal=True, implementation="cudnn"
        )
    # Packed rows need cuDNN's segment offsets, which jax.nn.dot_product_attention does not
    # expose; jax's own cuDNN wrapper takes them.
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

    lengths_BM, offsets_BM1 = segment_runs(segment_ids_BL, min(max_runs, q_BLNH.shape[1]))
    return dot_product_attention(
        q_BLNH, k_BLKH, v_BLKH, None, None, lengths_BM, lengths_BM, offsets_BM1, offsets_BM1,
        scale=scale, mask_type=MaskType.PADDING_CAUSAL, qkv_layout="BTNH",
    )  # fmt: skip


def _splash(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL):
    from jaxllm.models.splash import splash_attention

    return splash_attention(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL)


ATTENTION: dict[str, AttentionFn] = {"xla": _xla, "cudnn": _cudnn, "splash": _splash}


def _gpu_capability() -> str:
    """The first device's CUDA compute capability ("9.0"), "" where jax reports none (an
    AMD GPU, an older plugin)."""
    return str(getattr(jax.devices()[0], "compute_capability", "") or "")


def _cudnn_runs_on(capability: str, at_least: float = 8.0) -> bool:
    """cuDNN's fused attention needs an Ampere or newer NVIDIA GPU (compute capability 8.0:
    A100, L4, H100); a T4 (7.5) or V100 (7.0) has none, nor does a ROCm device."""
    try:
        return float(capability) >= at_least
    except ValueError:
        return False


def resolve_attention(
    cfg: ModelConfig, backend: str | None = None, capability: str | None = None
) -> str:
    """The kernel `cfg.attention` means on `backend` (default: `target_platform()`, this
    host's unless lowering for another): `auto` takes the fused kernel of the platform when
    the compute dtype is 16-bit and there is no attention dropout, else xla; an explicit
    choice the platform cannot run is an error. On a GPU, cudnn also needs compute
    capability 8.0 or newer (`capability`; default: the device's when `backend` is jax's own,
    else assumed) and a head size that is a multiple of 8, at most 128 (256 from Hopper, 9.0,
    on; assumed when the capability is not known)."""
    if (
        capability is None
        and backend is None
        and target_platform() == jax.default_backend() == "gpu"
    ):
        capability = _gpu_capability()
    backend = backend or target_platform()
    native = {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}.get(backend)
    old_gpu = native == "cudnn" and capability is not None and not _cudnn_runs_on(capability)
    h = cfg.head_size
    head_max = 128 if capability is not None and not _cudnn_runs_on(capability, 9.0) else 256
    odd_head = native == "cudnn" and (h % 8 or h > head_max)
    fits = cfg.dtype in _LOW_PRECISION or native == "splash"
    if cfg.attention == "auto":
        usable = native and fits and cfg.dropout == 0.0 and not old_gpu and not odd_head
        return native if usable else "xla"
    if cfg.attention == "xla":
        return "xla"
    if native != cfg.attention:
        raise ConfigError(
            f"{_KEY} {cfg.attention!r} needs a "
            f"{'GPU' if cfg.attention == 'cudnn' else 'TPU'}, this is {backend}; use auto or xla"
        )
    if old_gpu:
        raise ConfigError(
            f"{_KEY} cudnn needs an NVIDIA GPU of compute capability 8.0 or newer "
            f"(A100, L4, H100), this one reports {capability or 'none'}; use auto or xla"
        )
    if odd_head:
        raise ConfigError(
            f"{_KEY} cudnn needs a head size that is a multiple of 8 and at most "
            f"{head_max}, this model's is {h}; use auto or xla"
        )
    if not fits:
        raise ConfigError(f"{_KEY} cudnn needs dtype bfloat16 or float16, got {cfg.dtype}")
    if cfg.dropout:
        raise ConfigError(f"{_KEY} {cfg.attention} runs without attention dropout")
    return cfg.attention
