"""Weight-only quantisation (models/quant.py): the per-group error bound against a numpy
reference, quantised logits near the float model's, scanned = unrolled, QLoRA's gradients
reaching only the adapters, and refusals naming the config key."""

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import ModelConfig, PeftConfig, QuantizeConfig
from jaxllm.models import make_decoder
from jaxllm.models.lora import apply_lora, merge_lora
from jaxllm.models.quant import (
    QUANT_METHODS,
    QuantWeight,
    dequantize,
    is_quantized,
    quantize_array,
    quantize_model,
)
from jaxllm.trainers.lm import trainable_filter

SMALL = ModelConfig(
    vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=32,
    positions="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False,
)  # fmt: skip


def numpy_reference(w: np.ndarray, qmax: int, group: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(scale per input element, per-element bound) for a 2-D weight [in, out]: symmetric
    absmax over each group of `group` input rows (all rows when None) and output column;
    values round to nearest, so |w - q·s| <= s / 2 with s = absmax / (qmax + 0.5), plus
    float32's rounding of w / s and q · s (one unit of float32 eps relative to absmax)."""
    k, m = w.shape
    g = k if group is None else min(group, k)
    absmax = np.abs(w.reshape(k // g, g, m)).max(axis=1)  # [groups, out]
    scale = absmax / (qmax + 0.5)
    bound = scale / 2 + np.finfo(np.float32).eps * absmax
    return np.repeat(scale, g, axis=0), np.repeat(bound, g, axis=0)


@pytest.mark.parametrize("method,group", [("int8", None), ("int4", 32), ("int4", 128)])
def test_dequantised_within_closed_form_bound(method, group):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((256, 96)) * rng.uniform(0.01, 2.0, (1, 96))).astype(np.float32)
    w[5, 7] = 9.0  # an outlier widens its own group's scale only
    q = quantize_array(jnp.asarray(w), 1, False, QUANT_METHODS[method], group or 128)
    assert q.qvalue.dtype == QUANT_METHODS[method].qtype
    scale, bound = numpy_reference(w, QUANT_METHODS[method].qmax, group)
    np.testing.assert_allclose(np.repeat(np.asarray(q.scale), 256 // q.scale.shape[0], 0),
                               scale, rtol=1e-6)  # fmt: skip
    err = np.abs(np.asarray(dequantize(q.qvalue, q.scale)) - w)
    assert (err <= bound).all(), float((err / bound).max())
    assert (err / bound).max() > 0.9  # the bound is tight, not vacuous
    vals = np.asarray(q.qvalue.astype(jnp.int32))
    assert (
        vals.min() >= -QUANT_METHODS[method].qmax - 1 and vals.max() <= QUANT_METHODS[method].qmax
    )


def test_attention_output_groups_within_each_head():
    """attn.o is [heads, head_dim, out]: int4 groups run along head_dim inside each head."""
    w = jax.random.normal(jax.random.key(1), (4, 16, 32))
    q = quantize_array(w, 2, False, QUANT_METHODS["int4"], 8)
    assert q.scale.shape == (4, 2, 32)
    flat = np.asarray(w).reshape(64, 32)
    _, bound = numpy_reference(flat, 7, 8)
    err = np.abs(np.asarray(dequantize(q.qvalue, q.scale)).reshape(64, 32) - flat)
    assert (err <= bound).all()


def _model(cfg=SMALL):
    with nnx.use_eager_sharding(False):
        return make_decoder(cfg)


def _logits(model, tokens) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens))


def _quantized(model, method, group=32, **kw):
    with nnx.use_eager_sharding(False):
        return quantize_model(model, QuantizeConfig(method, group, **kw))


@pytest.mark.slow
def test_quantised_logits_close_to_float():
    tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, SMALL.vocab_size)
    base = _model()  # built once (random init is the slow part), cloned per method
    ref = _logits(base, tokens)
    errs = {}
    for method in ("int8", "int4"):
        model = nnx.clone(base)
        paths = _quantized(model, method)
        assert len(paths) == 2 * 7 + 1 and "head" in paths and is_quantized(model)
        out = _logits(model, tokens)
        errs[method] = np.abs(out - ref).max() / ref.std()
        agree = (out.argmax(-1) == ref.argmax(-1)).mean()
        assert agree > (0.95 if method == "int8" else 0.7), (method, agree)
    # int8's rounding step is ~1/17 of int4's: its logits error is an order smaller
    assert errs["int8"] < 0.05 and errs["int4"] < 0.5 and errs["int8"] < errs["int4"] / 5


@pytest.mark.slow
def test_scanned_equals_unrolled_and_scope():
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, SMALL.vocab_size)
    outs = []
    for scan in (False, True):
        model = _model(replace(SMALL, scan_layers=scan))
        _quantized(model, "int4")
        outs.append(_logits(model, tokens))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    model = _model()
    assert _quantized(model, "int8", scope=(r"mlp\.down$",)) == [
        "blocks.0.mlp.down", "blocks.1.mlp.down",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="quantize.scope"):
        _quantized(_model(), "int8", scope=(r"nothing$",))
    with pytest.raises(ValueError, match="quantize.group_size"):
        _quantized(_model(), "int4", group=48)


def test_qlora_gradients_reach_only_adapters():
    model = _model()
    _quantized(model, "int4")
    with nnx.use_eager_sharding(False):
        apply_lora(model, PeftConfig("lora", 4, 8.0), nnx.Rngs(1))
    peft = PeftConfig("lora", 4, 8.0)
    graphdef, params, frozen = nnx.split(model, trainable_filter(peft), ...)
    assert not jax.tree.leaves(nnx.filter_state(params, QuantWeight))
    assert jax.tree.leaves(nnx.filter_state(frozen, QuantWeight))
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, SMALL.vocab_size)

    def loss(params):
        logits = nnx.merge(graphdef, params, frozen)(tokens)
        return -jax.nn.log_softmax(logits)[..., 0].mean()

    grads = jax.jit(jax.grad(loss))(params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    lora_b = [g for p, g in nnx.to_flat_state(grads) if str(p[-1]).endswith("_lora_b")]
    assert max(float(jnp.abs(g[...]).max()) for g in lora_b) > 0
    with pytest.raises(ValueError, match="quantised weight"):
        merge_lora(nnx.merge(graphdef, params, frozen))
