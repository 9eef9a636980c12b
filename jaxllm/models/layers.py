"""Building blocks shared by the transformer models: parameters with logical axes, norms, MLPs,
token embeddings, sinusoidal positions, RoPE and dropout.

Dtype policy: parameters are stored in `cfg.param_dtype`; every matmul casts its weight to the
compute dtype `cfg.dtype` at use; norms, softmax and logits run in float32.

Every weight matmul goes through `dense`, which on CPU carries its own backward pass: XLA:CPU
hands dots to YNNPACK only in canonical layouts, so autodiff's weight gradient `x^T @ g` either
ran on Eigen's slower transposed-operand path (the MLP: ~60 GFLOP/s instead of ~95 per core)
or XLA transposed the whole [tokens, vocab] logits gradient for the tied output layer. `dense`
transposes the smaller operand instead. Same maths; on other backends it is a plain einsum.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import ModelConfig, RopeScalingConfig
from jaxllm.models.target import on_cpu

try:
    from jaxllm.sharding.rules import constrain
except ImportError:  # pragma: no cover - the sharding package is optional for the models

    def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
        return x


__all__ = [
    "MLP",
    "ParamKeys",
    "Embed",
    "Norm",
    "apply_rope",
    "compute_dtype",
    "RESIDUAL",
    "adapted",
    "constrain",
    "dense",
    "dropout",
    "lookup",
    "param",
    "project",
    "weight_value",
    "rope_inv_freq",
    "sinusoidal_positions",
]

Names = tuple[str | None, ...]
RESIDUAL = ("act_batch", "act_length", "act_embed")  # the residual stream's activation axes


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    return jnp.dtype(cfg.dtype)


class ParamKeys:
    """The keys `nnx.Rngs(seed).params()` gives — `fold_in(key(seed), i)` for i = 0, 1, ... —
    with the counter kept in Python. nnx.Rngs keeps it as a variable, and updating it while a
    model is built abstractly (`nnx.eval_shape`, jit) costs time proportional to the trace so
    far (jax builds an error message reading `.sharding` of a tracer): building a 48-layer
    model took 12 s, 96 layers a minute. Same keys, same weights."""

    def __init__(self, seed: int) -> None:
        self.key = jax.random.key(seed)
        self.count = 0

    def params(self) -> jax.Array:
        key = jax.random.fold_in(self.key, self.count)
        self.count += 1
        return key


def param(
    rngs: nnx.Rngs | ParamKeys,
    shape: tuple[int, ...],
    names: Names,
    dtype: str | jnp.dtype,
    std: float | None = None,
    fill: float = 0.0,
) -> nnx.Param:
    """A parameter with logical axes `names`: normal(std) when `std` is given, else constant."""
    if std is not None:
        init = nnx.initializers.normal(std)
    else:
        init = nnx.initializers.constant(fill)
    return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), shape, jnp.dtype(dtype)))


def _matmul_NM(x_NK: jax.Array, w: jax.Array, w_is_MK: bool, out_dtype) -> jax.Array:
    dims = (((1,), (1 if w_is_MK else 0,)), ((), ()))
    return jax.lax.dot_general(x_NK, w, dims, preferred_element_type=out_dtype)


def _materialized_T(a: jax.Array) -> jax.Array:
    """`a.T` written out, so that XLA cannot fold it back into the dot as a transposed
    operand (which YNNPACK does not take)."""
    return jax.lax.optimization_barrier(a.T)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dense_2d(x_NK: jax.Array, w: jax.Array, w_is_MK: bool, out_dtype, cpu: bool) -> jax.Array:
    """The matmul with a backward that casts the cotangent to the inputs' dtype first, so a
    result wider than the inputs (bf16 in, f32 logits out) still gets bf16 backward matmuls,
    as PyTorch's autocast does (autodiff made them f32 x bf16 dots: f32 GEMMs). On CPU
    (`cpu`, every dense layer) the backward also materialises the smaller operand's
    transpose, which YNNPACK needs; elsewhere it is only used for wider results."""
    return _matmul_NM(x_NK, w, w_is_MK, out_dtype)


def _dense_2d_fwd(x_NK, w, w_is_MK, out_dtype, cpu):
    return _matmul_NM(x_NK, w, w_is_MK, out_dtype), (x_NK, w)


def _dense_2d_bwd(w_is_MK, out_dtype, cpu, res, g_NM):
    x_NK, w = res
    g_NM = g_NM.astype(x_NK.dtype)
    dims = (((1,), (0 if w_is_MK else 1,)), ((), ()))
    dx_NK = jax.lax.dot_general(g_NM, w, dims).astype(x_NK.dtype)  # g @ w_KM.T
    if not cpu:  # [M, K] = g.T @ x, or [K, M] = x.T @ g
        dw = jax.lax.dot_general(
            *((g_NM, x_NK) if w_is_MK else (x_NK, g_NM)), (((0,), (0,)), ((), ()))
        )
        return dx_NK, dw.astype(w.dtype)
    k, m = x_NK.shape[1], g_NM.shape[1]
    # dW = x^T @ g, contracting over the N tokens: transpose whichever of x, g is smaller.
    if k <= m:
        dw_KM = _materialized_T(x_NK) @ g_NM
        dw = jax.lax.optimization_barrier(dw_KM).T if w_is_MK else dw_KM
    else:
        dw_MK = _materialized_T(g_NM) @ x_NK
        dw = dw_MK if w_is_MK else jax.lax.optimization_barrier(dw_MK).T
    return dx_NK, dw.astype(w.dtype)


_dense_2d.defvjp(_dense_2d_fwd, _dense_2d_bwd)


def dense(
    x: jax.Array,
    w: jax.Array,
    n_in: int = 1,
    *,
    w_is_out_in: bool = False,
    out_dtype=None,
) -> jax.Array:
    """Contracts the last `n_in` axes of `x` with the first `n_in` axes of `w` (or, with
    `w_is_out_in`, w is [out, in] — the tied embedding — and is contracted on its last axes):
    `einsum("...k,k...->...")` as one 2-D matmul. `out_dtype` sets the accumulation/output
    dtype (e.g. float32 logits from bfloat16 inputs)."""
    batch, k_shape = x.shape[: x.ndim - n_in], x.shape[x.ndim - n_in :]
    out_shape = w.shape[: w.ndim - n_in] if w_is_out_in else w.shape[n_in:]
    k, m = math.prod(k_shape), math.prod(out_shape)
    w2 = w.reshape((m, k) if w_is_out_in else (k, m))
    x2 = x.reshape(-1, k)
    cpu = on_cpu()
    wider = out_dtype is not None and jnp.dtype(out_dtype).itemsize > x2.dtype.itemsize
    if cpu or wider:
        y = _dense_2d(x2, w2, w_is_out_in, out_dtype, cpu)
    else:
        y = _matmul_NM(x2, w2, w_is_out_in, out_dtype)
    return y.reshape(batch + out_shape)


LORA_A, LORA_B = "_lora_a", "_lora_b"  # adapter attribute suffixes (see models/lora.py)
QUANT_SCALE = "_qscale"  # a quantised weight's scales (see models/quant.py)


def weight_value(module: nnx.Module, name: str, dtype) -> jax.Array:
    """`module.<name>` in `dtype`; a quantised weight (int values with `<name>_qscale`
    beside it) is dequantised first, in float32 (qwix: scale * values per group)."""
    w = getattr(module, name)[...]
    scale = getattr(module, name + QUANT_SCALE, None)
    if scale is None:
        return w.astype(dtype)
    import qwix  # local: only quantised models need it

    return qwix.dequantize(qwix.QArray(w, scale[...].astype(jnp.float32))).astype(dtype)


def project(
    module: nnx.Module,
    name: str,
    x: jax.Array,
    n_in: int = 1,
    *,
    key: jax.Array | None = None,
    out_dtype=None,
) -> jax.Array:
    """`dense(x, module.<name>)` in the module's compute dtype (dequantised when quantised), plus the weight's LoRA adapter
    `scale * dropout(x) A B` when one is attached (`<name>_lora_a`, `<name>_lora_b`): two thin
    matmuls, never the [in, out] product, so the backward pass costs rank-sized work."""
    dtype = module.dtype
    y = dense(x, weight_value(module, name, dtype), n_in, out_dtype=out_dtype)
    a = getattr(module, name + LORA_A, None)
    if a is None:
        return y
    b = getattr(module, name + LORA_B)
    h = dense(dropout(x, module.lora_dropout, key), a[...].astype(dtype), n_in)
    delta = dense(h, b[...].astype(dtype), 1, out_dtype=out_dtype) * module.lora_scale
    return y + delta.astype(y.dtype)


def adapted(adapter: nnx.Module | None, h_BLD: jax.Array) -> jax.Array:
    """A sublayer's output through its PEFT bottleneck adapter, when one is attached."""
    return h_BLD if adapter is None else adapter(h_BLD)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when `rate == 0` or `key is None` (evaluation)."""
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class Norm(nnx.Module):
    """LayerNorm (bias when `cfg.use_bias`) or RMSNorm, computed in float32."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.kind = cfg.norm
        self.eps = cfg.norm_eps
        self.dtype = compute_dtype(cfg)
        self.scale = param(rngs, (cfg.d_model,), ("norm",), cfg.param_dtype, fill=1.0)
        has_bias = cfg.norm == "layernorm" and cfg.use_bias
        self.bias = param(rngs, (cfg.d_model,), ("norm",), cfg.param_dtype) if has_bias else None

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        x = x_BLD.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        x = x * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            x = x + self.bias[...].astype(jnp.float32)
        return x.astype(self.dtype)


class MLP(nnx.Module):
    """GPT-2 MLP (`gelu`: tanh-approximated GELU, "gelu_new"; `gelu_exact`: the erf form,
    BERT's) or Llama's SwiGLU."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f, pd = cfg.d_model, cfg.d_ff, cfg.param_dtype
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)  # GPT-2 residual scaling
        self.kind = cfg.mlp
        self.dtype = compute_dtype(cfg)
        self.up = param(rngs, (d, f), ("embed", "mlp"), pd, cfg.init_std)
        glu, bias = cfg.mlp == "swiglu", cfg.use_bias
        self.gate = param(rngs, (d, f), ("embed", "mlp"), pd, cfg.init_std) if glu else None
        self.down = param(rngs, (f, d), ("mlp", "embed"), pd, out_std)
        self.up_bias = param(rngs, (f,), ("mlp",), pd) if bias else None
        self.gate_bias = param(rngs, (f,), ("mlp",), pd) if bias and glu else None
        self.down_bias = param(rngs, (d,), ("embed",), pd) if bias else None

    def _proj(self, x: jax.Array, name: str, key: jax.Array | None):
        y = project(self, name, x, key=key)
        bias = getattr(self, f"{name}_bias")
        return y if bias is None else y + bias[...].astype(self.dtype)

    def __call__(self, x_BLD: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """`key` only drives LoRA dropout (the block applies the residual dropout)."""
        keys = [None] * 3 if key is None else list(jax.random.split(key, 3))
        h_BLF = self._proj(x_BLD, "up", keys[0])
        if self.gate is not None:
            g_BLF = self._proj(x_BLD, "gate", keys[1])
            h_BLF = jax.nn.silu(g_BLF) * h_BLF
        else:
            h_BLF = jax.nn.gelu(h_BLF, approximate=self.kind == "gelu")
        h_BLF = constrain(h_BLF, ("act_batch", "act_length", "act_mlp"))
        return self._proj(h_BLF, "down", keys[2])


class Embed(nnx.Module):
    """Token embedding table [V, D]; `attend` reuses it as the tied output layer."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.dtype = compute_dtype(cfg)
        shape = (cfg.vocab_size, cfg.d_model)
        self.embedding = param(rngs, shape, ("vocab", "embed"), cfg.param_dtype, cfg.init_std)

    def __call__(self, tokens_BL: jax.Array) -> jax.Array:
        return lookup(self.embedding[...], tokens_BL, "vocab").astype(self.dtype)

    def attend(self, x_BLD: jax.Array, out_dtype: jnp.dtype = jnp.float32) -> jax.Array:
        """Tied logits `x @ E.T`, accumulated in float32, returned in `out_dtype`."""
        emb_VD = self.embedding[...].astype(self.dtype)
        return dense(x_BLD, emb_VD, w_is_out_in=True, out_dtype=out_dtype)


def lookup(table_RD: jax.Array, ids_BL: jax.Array, row_axis: str | None) -> jax.Array:
    """`table[ids]` [B, L, D] with the table's `embed` axis gathered first (kept split only
    along `row_axis`, e.g. vocab over `tensor`) and the output on the activation axes.

    Indexing a table split over `fsdp` with a batch split over (data, fsdp) leaves XLA no
    efficient plan: it rematerialised the global indices on every device (and a global
    [B, L, D] gradient in the backward scatter-add). Gathering the weight is FSDP's usual
    cost; the gradient then leaves as a reduce-scatter of the local scatter-add."""
    table_RD = constrain(table_RD, (row_axis, None))
    return constrain(table_RD[ids_BL], RESIDUAL)


def sinusoidal_positions(positions_BL: jax.Array, d_model: int) -> jax.Array:
    """Fixed sin/cos position encodings [B, L, D]: sines in the first half, cosines in the
    second (tensor2tensor layout), timescales from 1 to 10^4 as in Vaswani et al."""
    half = d_model // 2
    inv_freq = 1.0 / (10000.0 ** (np.arange(half, dtype=np.float32) / max(half - 1, 1)))
    angles_BLF = positions_BL.astype(jnp.float32)[..., None] * inv_freq
    out = jnp.concatenate([jnp.sin(angles_BLF), jnp.cos(angles_BLF)], axis=-1)
    return jnp.pad(out, ((0, 0), (0, 0), (0, d_model - 2 * half)))


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScalingConfig) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] as HF transformers computes them (default, linear
    and llama3 rope types); a host-side numpy constant, so it folds into the program."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim)
    inv = inv.astype(np.float32)
    if scaling.type == "linear":
        return (inv / scaling.factor).astype(np.float32)
    if scaling.type != "llama3":
        return inv
    factor, lo, hi = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old_len = scaling.original_max_seq_len
    wavelen = 2 * math.pi / inv
    # Long wavelengths (low frequencies) are slowed by `factor`, short ones kept, and the band
    # between interpolates smoothly (Llama 3.1).
    scaled = np.where(wavelen > old_len / lo, inv / factor, inv)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_angles(positions_BL: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [B, L, H/2] in float32, computed once per forward and shared by layers."""
    angles_BLF = positions_BL.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles_BLF), jnp.sin(angles_BLF)


def apply_rope(x_BLNH: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotates head vectors [B, L, heads, H] in the rotate-half ("NeoX", HF Llama) layout:
    dims i and i + H/2 form a pair. Rotation runs in float32 and casts back."""
    cos_BL1F, sin_BL1F = (a[:, :, None, :] for a in rope)
    x1, x2 = jnp.split(x_BLNH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos_BL1F - x2 * sin_BL1F, x2 * cos_BL1F + x1 * sin_BL1F], -1)
    return out.astype(x_BLNH.dtype)
