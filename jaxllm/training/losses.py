"""Pure loss functions. Each returns *sums* plus the weight they are a sum over, so gradient
accumulation and multi-device reduction stay exact (the step divides once at the end)."""

from __future__ import annotations

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.models.logits import temper
from jaxllm.models.target import on_cpu

_CHUNK = 32  # vocab reductions run as [.., V / 32, 32]: see `_chunked`


def _chunked(x_BLV: jax.Array) -> jax.Array | None:
    """[..., V] viewed as [..., V / 32, 32] (None if 32 does not divide V). XLA:CPU splits a
    long reduction into a tree of 32-wide windows that cannot fuse with the elementwise work
    feeding them, so the inputs were written out in full; reducing the 32-wide axis
    explicitly runs in one fused pass (max over V: 10 ms -> 5 ms on [4096, 8000], one core).
    CPU only: other backends compile the plain reduction.
    """
    v = x_BLV.shape[-1]
    if v % _CHUNK or not on_cpu():  # GPUs/TPUs reduce V in one pass
        return None
    return x_BLV.reshape(*x_BLV.shape[:-1], v // _CHUNK, _CHUNK)


def _vocab_max(logits_BLV: jax.Array) -> jax.Array:
    chunks = _chunked(logits_BLV)
    if chunks is None:
        return jnp.max(logits_BLV, axis=-1)
    return jnp.max(jnp.max(chunks, axis=-1), axis=-1)


def _max_and_sumexp(logits_BLV: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The shifted log-sum-exp pieces, as `jax.nn.logsumexp` forms them, in float32 (16-bit
    logits are upcast element by element inside the reduction)."""
    m_BL = _vocab_max(logits_BLV).astype(jnp.float32)
    m_BL = jnp.where(jnp.isfinite(m_BL), m_BL, 0.0)
    return m_BL, jnp.sum(jnp.exp(logits_BLV.astype(jnp.float32) - m_BL[..., None]), axis=-1)


def _is_target(logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
    return _iota(logits_BLV.shape) == targets_BL[..., None]


@jax.custom_vjp
def _lse_and_target_logit(logits_BLV: jax.Array, targets_BL: jax.Array):
    """(logsumexp(logits), logits[target]) per token in float32, with a one-pass backward.
    bf16 logits stay bf16 in memory (the residual and the gradient): only the arithmetic
    is f32, as PyTorch's cross-entropy under autocast does it."""
    return _lse_and_target_logit_fwd(logits_BLV, targets_BL)[0]


def _lse_and_target_logit_fwd(logits_BLV, targets_BL):
    m_BL, s_BL = _max_and_sumexp(logits_BLV)
    target_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
    lse_BL = jnp.log(s_BL) + m_BL
    return (lse_BL, target_BL.astype(jnp.float32)), (logits_BLV, targets_BL, m_BL, s_BL)


def _lse_and_target_logit_bwd(res, g):
    # Autodiff gave the same numbers in three [B, L, V] passes plus a scatter (the gradient of
    # take_along_axis) that XLA:CPU then transposed: here it is one fused elementwise pass.
    logits_BLV, targets_BL, m_BL, s_BL = res
    g_lse_BL, g_target_BL = g
    d_BLV = jnp.exp(logits_BLV.astype(jnp.float32) - m_BL[..., None]) * (g_lse_BL / s_BL)[..., None]
    d_BLV = jnp.where(_is_target(logits_BLV, targets_BL), d_BLV + g_target_BL[..., None], d_BLV)
    return d_BLV.astype(logits_BLV.dtype), np.zeros(targets_BL.shape, jax.dtypes.float0)


_lse_and_target_logit.defvjp(_lse_and_target_logit_fwd, _lse_and_target_logit_bwd)


def _first_argmax(logits_BLV: jax.Array) -> jax.Array:
    """`jnp.argmax` (the first maximum; NaN logits count as no maximum). XLA:CPU runs argmax's
    (value, index) pair reduction unvectorised (~150 ms for [4096, 8000] on one core, 5% of
    a small LM's train step); this finds the first 32-wide chunk holding the maximum from
    the chunk maxima, then the first maximum inside that chunk: ~20 ms, same answer."""
    vocab = logits_BLV.shape[-1]
    chunks_BLCK = _chunked(logits_BLV)
    if chunks_BLCK is None:
        is_max_BLV = logits_BLV == jnp.max(logits_BLV, axis=-1, keepdims=True)
        return jnp.min(jnp.where(is_max_BLV, _iota(logits_BLV.shape), vocab), axis=-1)
    n_chunks = chunks_BLCK.shape[-2]
    chunk_max_BLC = jnp.max(chunks_BLCK, axis=-1)
    m_BL1 = jnp.max(chunk_max_BLC, axis=-1, keepdims=True)
    first_BL = jnp.min(
        jnp.where(chunk_max_BLC == m_BL1, _iota(chunk_max_BLC.shape), n_chunks), axis=-1
    )
    first_BL = jnp.minimum(first_BL, n_chunks - 1)  # NaN rows: any chunk, then no match
    chunk_BLK = jnp.take_along_axis(chunks_BLCK, first_BL[..., None, None], axis=-2)[..., 0, :]
    within_BL = jnp.min(jnp.where(chunk_BLK == m_BL1, _iota(chunk_BLK.shape), vocab), axis=-1)
    return first_BL * _CHUNK + within_BL


def _iota(shape: tuple[int, ...]) -> jax.Array:
    return jax.lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1)


def cross_entropy(
    logits_BLV: jax.Array, targets_BL: jax.Array, mask_BL: jax.Array, z_loss: float = 0.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Masked next-token cross-entropy, summed over tokens; `weight` = number of tokens.

    With `z_loss > 0` adds `z_loss * logsumexp(logits)^2` per token (PaLM), which keeps the
    softmax normaliser near 1 and the logits from drifting in low precision.
    """
    chex.assert_rank(logits_BLV, targets_BL.ndim + 1)
    chex.assert_equal_shape([logits_BLV[..., 0], targets_BL, mask_BL])
    mask_BL = mask_BL.astype(jnp.float32)
    targets_BL = targets_BL.astype(jnp.int32)
    lse_BL, target_logit_BL = _lse_and_target_logit(logits_BLV, targets_BL)
    nll_BL = lse_BL - target_logit_BL
    ce = jnp.sum(nll_BL * mask_BL)
    zl = jnp.sum(jnp.square(lse_BL) * mask_BL)
    predicted_BL = _first_argmax(jax.lax.stop_gradient(logits_BLV))
    correct = jnp.sum((predicted_BL == targets_BL) * mask_BL)
    total = ce + z_loss * zl if z_loss else ce
    return total, {"ce": ce, "z_loss": zl, "correct": correct, "weight": jnp.sum(mask_BL)}


def _tempered(logits_BLV: jax.Array, temperature: float) -> jax.Array:
    """f32 logits / temperature, as the sampler tempers them (`temper`: temperature 1 leaves
    the program as it was, no divide); a learner needs a distribution, so T must be > 0."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return temper(logits_BLV, temperature)


def token_logprobs(
    logits_BLV: jax.Array, targets_BL: jax.Array, temperature: float = 1.0
) -> jax.Array:
    """log p(target) per token in f32 (logit[target] - logsumexp), differentiable with the
    one-pass backward of `_lse_and_target_logit`; the building block for sequence log-probs
    in DPO / PPO / GRPO. `temperature` (a Python number) scores under softmax(logits / T),
    the distribution RL rollouts sampled from at temperature T (PPO / GRPO pass theirs)."""
    logits_BLV = _tempered(logits_BLV, temperature)
    lse_BL, target_logit_BL = _lse_and_target_logit(logits_BLV, targets_BL.astype(jnp.int32))
    return target_logit_BL - lse_BL


def _plogq(p_BLV: jax.Array, x_BLV: jax.Array) -> jax.Array:
    """p * x with 0 where p == 0, so -inf logits (banned tokens) give 0 rather than NaN; x is
    replaced there too, else the untaken branch's gradient (0 * inf) would still be NaN."""
    live_BLV = p_BLV > 0
    return jnp.where(live_BLV, p_BLV * jnp.where(live_BLV, x_BLV, 0.0), 0.0)


def token_entropy(logits_BLV: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Entropy of softmax(logits / temperature) per token in f32 (nats): an exploration
    metric / bonus, of the distribution RL rollouts sampled from at that temperature."""
    logp_BLV = jax.nn.log_softmax(_tempered(logits_BLV, temperature), axis=-1)
    return -jnp.sum(_plogq(jnp.exp(logp_BLV), logp_BLV), axis=-1)


def token_kl(
    logits_BLV: jax.Array, ref_logits_BLV: jax.Array, temperature: float = 1.0
) -> jax.Array:
    """Exact KL(pi || ref) per position in f32 (nats), summed over the whole vocabulary, of
    softmax(logits / temperature) against the reference's: how far a policy's next-token
    distributions have moved along a given text (no sampling noise, unlike k1/k2/k3)."""
    logp_BLV = jax.nn.log_softmax(_tempered(logits_BLV, temperature), axis=-1)
    ref_logp_BLV = jax.nn.log_softmax(_tempered(ref_logits_BLV, temperature), axis=-1)
    return jnp.sum(_plogq(jnp.exp(logp_BLV), logp_BLV - ref_logp_BLV), axis=-1)


def distill_loss(
    student_BLV: jax.Array,
    teacher_BLV: jax.Array,
    mask_BL: jax.Array,
    temperature: float = 1.0,
    kind: str = "forward",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token-level distillation KL on temperature-softened distributions, summed over masked
    tokens and scaled by temperature**2 (Hinton et al.) so gradient size does not shrink as T
    grows. `kind="forward"`: KL(teacher || student), mass-covering (classic KD);
    `"reverse"`: KL(student || teacher), mode-seeking (MiniLLM-style). The teacher is under
    stop_gradient. aux: `kl` = unscaled KL sum, `weight` = number of tokens.
    """
    if kind not in ("forward", "reverse"):
        raise ValueError(f"distill_loss kind must be 'forward' or 'reverse', got {kind!r}")
    t = temperature
    teacher_BLV = jax.lax.stop_gradient(teacher_BLV)
    logp_s_BLV = jax.nn.log_softmax(student_BLV.astype(jnp.float32) / t, axis=-1)
    logp_t_BLV = jax.nn.log_softmax(teacher_BLV.astype(jnp.float32) / t, axis=-1)
    if kind == "forward":
        p_BLV, diff_BLV = jnp.exp(logp_t_BLV), logp_t_BLV - logp_s_BLV
    else:
        p_BLV, diff_BLV = jnp.exp(logp_s_BLV), logp_s_BLV - logp_t_BLV
    kl_BL = jnp.sum(_plogq(p_BLV, diff_BLV), axis=-1)
    mask_BL = mask_BL.astype(jnp.float32)
    kl = jnp.sum(kl_BL * mask_BL)
    return kl * (t * t), {"kl": kl, "weight": jnp.sum(mask_BL)}


def head_cross_entropy(
    x_BLD: jax.Array,
    w_VD: jax.Array,
    targets_BL: jax.Array,
    mask_BL: jax.Array,
    z_loss: float = 0.0,
    chunk: int = 32,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`cross_entropy(x @ w.T, ...)` for a tied output layer `w` [V, D], run `chunk`
    positions of every row at a time, so the [B, L, V] logits never exist as a whole.

    Under differentiation each chunk's forward also forms its logits' gradient and folds
    it into dx [B, L, D] and dw [V, D] at once (the gradient of the sums is known once the
    softmax is: mask * ((1 + 2 z lse) softmax - onehot)); the backward pass only scales
    them. The FLOPs are those of the plain path; the memory traffic of [B, L, V] arrays
    written and read again five times is gone. Differentiable through the loss only (the
    aux sums are metrics). `chunk` must divide L (else the whole length is one chunk).
    """
    chex.assert_rank([x_BLD, w_VD, targets_BL, mask_BL], [3, 2, 2, 2])
    chex.assert_equal_shape([x_BLD[..., 0], targets_BL, mask_BL])
    chex.assert_equal(x_BLD.shape[-1], w_VD.shape[-1])
    if chunk <= 0 or x_BLD.shape[1] % chunk:
        chunk = x_BLD.shape[1]
    return _head_ce(x_BLD, w_VD, targets_BL.astype(jnp.int32), mask_BL.astype(jnp.float32),
                    float(z_loss), chunk)  # fmt: skip


def _head_ce_scan(x_BLD, w_VD, targets_BL, mask_BL, z_loss: float, chunk: int, grads: bool):
    from jaxllm.models.layers import dense  # local: models import this module's users

    b, length, d = x_BLD.shape
    n = length // chunk

    def split(a):  # [B, L, ...] -> [n, B, chunk, ...]: the batch axis keeps its sharding
        return jnp.moveaxis(a.reshape(b, n, chunk, *a.shape[2:]), 1, 0)

    w = w_VD.astype(x_BLD.dtype)

    def body(dw_VD, xs):
        x_BCD, t_BC, m_BC = xs
        logits_BCV = dense(x_BCD, w, w_is_out_in=True, out_dtype=jnp.float32)
        mx_BC, s_BC = _max_and_sumexp(logits_BCV)
        lse_BC = jnp.log(s_BC) + mx_BC
        target_BC = jnp.take_along_axis(logits_BCV, t_BC[..., None], axis=-1)[..., 0]
        correct = jnp.sum((_first_argmax(logits_BCV) == t_BC) * m_BC)
        sums = (jnp.sum((lse_BC - target_BC) * m_BC), jnp.sum(jnp.square(lse_BC) * m_BC), correct)
        if not grads:
            return dw_VD, (*sums, None)
        scale_BC = m_BC * (1.0 + 2.0 * z_loss * lse_BC) / s_BC
        g_BCV = jnp.exp(logits_BCV - mx_BC[..., None]) * scale_BC[..., None]
        g_BCV = jnp.where(_is_target(logits_BCV, t_BC), g_BCV - m_BC[..., None], g_BCV)
        g_BCV = g_BCV.astype(x_BLD.dtype)
        dx_BCD = dense(g_BCV, w, out_dtype=jnp.float32)
        dw_VD = dw_VD + jax.lax.dot_general(
            g_BCV, x_BCD, (((0, 1), (0, 1)), ((), ())), preferred_element_type=jnp.float32
        )
        return dw_VD, (*sums, dx_BCD)

    dw0 = jnp.zeros(w_VD.shape, jnp.float32) if grads else None
    dw_VD, (ce, zl, correct, dx) = jax.lax.scan(
        body, dw0, (split(x_BLD), split(targets_BL), split(mask_BL))
    )
    ce, zl = jnp.sum(ce), jnp.sum(zl)
    total = ce + z_loss * zl if z_loss else ce
    aux = {"ce": ce, "z_loss": zl, "correct": jnp.sum(correct), "weight": jnp.sum(mask_BL)}
    if not grads:
        return (total, aux), None
    dx_BLD = jnp.moveaxis(dx, 0, 1).reshape(b, length, d)
    return (total, aux), (dx_BLD.astype(x_BLD.dtype), dw_VD.astype(w_VD.dtype))


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _head_ce(x_BLD, w_VD, targets_BL, mask_BL, z_loss: float, chunk: int):
    return _head_ce_scan(x_BLD, w_VD, targets_BL, mask_BL, z_loss, chunk, grads=False)[0]


def _head_ce_fwd(x_BLD, w_VD, targets_BL, mask_BL, z_loss: float, chunk: int):
    out, (dx_BLD, dw_VD) = _head_ce_scan(
        x_BLD, w_VD, targets_BL, mask_BL, z_loss, chunk, grads=True
    )
    return out, (dx_BLD, dw_VD, targets_BL, mask_BL)


def _head_ce_bwd(z_loss: float, chunk: int, res, g):
    dx_BLD, dw_VD, targets_BL, mask_BL = res
    g_total = g[0]  # the aux sums are metrics: their cotangents are not propagated
    return (
        (dx_BLD * g_total).astype(dx_BLD.dtype),
        (dw_VD * g_total).astype(dw_VD.dtype),
        np.zeros(targets_BL.shape, jax.dtypes.float0),
        jnp.zeros_like(mask_BL),
    )


_head_ce.defvjp(_head_ce_fwd, _head_ce_bwd)


def mlm_nsp_loss(
    mlm_logits_BMV: jax.Array,
    targets_BM: jax.Array,
    weights_BM: jax.Array,
    nsp_logits_B2: jax.Array,
    nsp_labels_B: jax.Array,
    nsp_weights_B: jax.Array,
    nsp: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The masked-LM + NSP pretraining loss, summed over rows; `weight` = number of rows
    (pairs: `nsp_weights_B` is 1 on every real row). `nsp=False` (RoBERTa): the loss is the
    MLM term alone, and aux has no NSP figures.

    Each row is one example: its masked-LM term is the mean cross-entropy over its own chosen
    positions, its NSP term the cross-entropy of its label, so loss / weight = (the mean over
    rows of each row's mean MLM cross-entropy) + (the mean NSP cross-entropy). The MLM term
    weights rows equally, not tokens: a token of a row with few chosen positions (a short
    row) counts more than one of a full row. BERT (Google's `run_pretraining.py`) and HF's
    `BertForPreTraining` / `BertForMaskedLM` average the MLM cross-entropy over all chosen
    tokens of the batch instead (every token equal), then add the mean NSP loss; the two
    agree only when every row has as many chosen tokens. Per-row means keep the loss a
    plain sum over rows, exact under gradient accumulation and over processes. aux sums:
    `mlm_loss`, `nsp_loss` (per row), `mlm_ce` / `mlm_correct` / `mlm_tokens` (over chosen
    tokens: `mlm_ce / mlm_tokens` is the token mean, HF's MLM loss, which stage mlm's
    held-out `val_mlm_loss_*` report; the training log's `mlm_loss` is the row mean),
    `mlm_accuracy` (each row's share of its chosen tokens predicted right: / weight, the mean
    over rows, as `mlm_loss`), `nsp_accuracy` (correct rows).
    """
    ce_B, mlm_B = jax.vmap(cross_entropy)(mlm_logits_BMV, targets_BM, weights_BM)
    nsp_ce, nsp_aux = cross_entropy(nsp_logits_B2, nsp_labels_B, nsp_weights_B)
    aux = {**_mlm_sums(ce_B, mlm_B), "weight": nsp_aux["weight"]}
    if not nsp:
        return aux["mlm_loss"], aux
    return aux["mlm_loss"] + nsp_ce, {**aux, "nsp_loss": nsp_ce, "nsp_accuracy": nsp_aux["correct"]}


def _mlm_sums(ce_B: jax.Array, mlm_B: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The masked-LM sums of `mlm_nsp_loss`'s aux from per-row `cross_entropy` results."""
    tokens_B = jnp.maximum(mlm_B["weight"], 1.0)
    return {
        "mlm_loss": jnp.sum(ce_B / tokens_B),
        "mlm_accuracy": jnp.sum(mlm_B["correct"] / tokens_B),
        "mlm_ce": jnp.sum(ce_B),
        "mlm_correct": jnp.sum(mlm_B["correct"]),
        "mlm_tokens": jnp.sum(mlm_B["weight"]),
    }


def electra_corrupt(
    tokens_BL: jax.Array, positions_BM: jax.Array, targets_BM: jax.Array, weights_BM: jax.Array,
    sampled_BM: jax.Array,
) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """ELECTRA's discriminator input: the original row (the masked row with its chosen
    positions' targets put back) with the generator's samples at the chosen positions, and
    the replaced-token labels [B, L] (1 where the token differs from the original: a sample
    that equals the original counts as original, as in Clark et al. 2020). Padding entries of
    `positions_BM` (weight 0) change nothing."""
    rows_B1 = jnp.arange(tokens_BL.shape[0])[:, None]
    chosen_BM = weights_BM > 0
    at_BM = tokens_BL[rows_B1, positions_BM]
    original_BL = tokens_BL.at[rows_B1, positions_BM].set(jnp.where(chosen_BM, targets_BM, at_BM))
    kept_BM = original_BL[rows_B1, positions_BM]
    corrupted_BL = original_BL.at[rows_B1, positions_BM].set(
        jnp.where(chosen_BM, sampled_BM.astype(tokens_BL.dtype), kept_BM)
    )
    return corrupted_BL, (corrupted_BL != original_BL).astype(jnp.float32)


def electra_loss_terms(
    gen_logits_BMV: jax.Array, targets_BM: jax.Array, weights_BM: jax.Array,
    disc_logits_BL: jax.Array, labels_BL: jax.Array, real_BL: jax.Array, rows_B: jax.Array,
    disc_weight: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:  # fmt: skip
    """ELECTRA's loss summed over rows (`weight` = rows, as `mlm_nsp_loss`): each row's mean
    generator cross-entropy over its chosen positions plus `disc_weight` × its mean
    replaced-token binary cross-entropy over its real tokens (`real_BL`). aux: the MLM sums of
    `mlm_nsp_loss` (of the generator) and `disc_ce` / `disc_correct` / `disc_tokens` /
    `disc_replaced` over real tokens."""
    ce_B, mlm_B = jax.vmap(cross_entropy)(gen_logits_BMV, targets_BM, weights_BM)
    mlm_sums = _mlm_sums(ce_B, mlm_B)
    x_BL, real_BL = disc_logits_BL.astype(jnp.float32), real_BL.astype(jnp.float32)
    bce_BL = jnp.maximum(x_BL, 0) - x_BL * labels_BL + jnp.log1p(jnp.exp(-jnp.abs(x_BL)))
    per_row_B = jnp.sum(bce_BL * real_BL, axis=1) / jnp.maximum(jnp.sum(real_BL, axis=1), 1.0)
    disc = jnp.sum(per_row_B * rows_B)
    correct_BL = ((x_BL > 0) == (labels_BL > 0)) * real_BL
    return mlm_sums["mlm_loss"] + disc_weight * disc, {
        **mlm_sums,
        "disc_loss": disc,
        "disc_ce": jnp.sum(bce_BL * real_BL),
        "disc_correct": jnp.sum(correct_BL),
        "disc_tokens": jnp.sum(real_BL),
        "disc_replaced": jnp.sum(labels_BL * real_BL),
        "weight": jnp.sum(rows_B),
    }
