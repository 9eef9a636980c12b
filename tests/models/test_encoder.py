"""The BERT encoder: the published parameter count, bidirectional attention that ignores
padding, and hidden states / pooled output equal to `transformers`' BertModel given the same
(random) weights."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import from_dict
from jaxllm.models.encoder import Encoder, encoder_params, make_encoder
from jaxllm.models.heads import BertPretrainModel, ClassifierModel


def preset(name: str, **kw):
    m = from_dict({"stage": "pretrain", "model": {"preset": name}}).model
    return dataclasses.replace(m, **kw)


def test_bert_base_has_the_published_size():
    m = preset("bert_base")
    abstract = nnx.state(nnx.eval_shape(lambda: Encoder(m, rngs=nnx.Rngs(0))), nnx.Param)
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))
    assert n == encoder_params(m) == 109_482_240  # BertModel(bert-base-uncased): "110M"


def test_attention_is_bidirectional_and_ignores_padding():
    m = preset("bert_tiny", vocab_size=100)
    enc = make_encoder(m)
    tokens = jnp.array([[2, 10, 11, 12, 3, 0, 0, 0]])
    seg = (tokens != 0).astype(jnp.int32)
    base = enc(tokens, segment_ids_BL=seg)
    later = enc(tokens.at[0, 3].set(50), segment_ids_BL=seg)
    assert not np.allclose(base[0, 1], later[0, 1])  # an earlier token sees a later one
    padded = enc(tokens.at[0, 6].set(77), segment_ids_BL=seg)
    np.testing.assert_allclose(padded[0, :5], base[0, :5], atol=1e-6)  # padding is invisible


def load_from_hf(enc: Encoder, hf) -> None:
    """Copies a transformers BertModel's weights into `enc` with the interop's mapping
    (`jaxllm/interop/bert.py`, what `stage: import` uses)."""
    from jaxllm.interop.bert import bert_specs

    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    state = nnx.state(enc, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    for spec in bert_specs(enc.cfg, "BertModel"):
        var = flat[spec.ours]
        var.set_value(jnp.asarray(spec.to_ours(sd[spec.hf]), var.get_value().dtype))
    nnx.update(enc, state)


def test_matches_transformers_bert():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    conf = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=40, type_vocab_size=2,
                                   initializer_range=0.3)  # large weights: GELU variants differ  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.BertModel(conf).eval()
    m = preset("bert_tiny", vocab_size=120, d_model=32, n_layers=2, n_heads=4, d_ff=64,
               max_seq_len=40)  # fmt: skip
    enc = make_encoder(m)
    load_from_hf(enc, hf)
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 120, (3, 12))
    types = np.zeros_like(tokens)
    types[:, 6:] = 1
    mask = np.ones_like(tokens)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    with torch.no_grad():
        out = hf(torch.tensor(tokens), attention_mask=torch.tensor(mask),
                 token_type_ids=torch.tensor(types))  # fmt: skip
    x = enc(
        jnp.asarray(tokens), segment_ids_BL=jnp.asarray(mask), token_types_BL=jnp.asarray(types)
    )
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(x)[real], out.last_hidden_state.numpy()[real], atol=1e-4)
    np.testing.assert_allclose(enc.pooled(x), out.pooler_output.numpy(), atol=1e-4)


def test_heads_shapes_and_zero_dropout_without_key():
    m = preset("bert_tiny", vocab_size=100)
    rngs = nnx.Rngs(0)
    model = BertPretrainModel(make_encoder(m), rngs=rngs)
    tokens = jnp.ones((2, 8), jnp.int32)
    mlm, nsp = model(tokens, jnp.array([[1, 2], [3, 0]]))
    assert mlm.shape == (2, 2, 100) and nsp.shape == (2, 2) and mlm.dtype == jnp.float32
    clf = ClassifierModel(make_encoder(m), 3, rngs=rngs)
    assert clf(tokens).shape == (2, 3)


def test_a_decoder_refuses_an_encoder_config():
    from jaxllm.models import make_decoder

    with pytest.raises(ValueError, match="model.arch: this is an encoder model"):
        make_decoder(preset("bert_tiny", vocab_size=100))


def test_rope_encoder_sees_relative_positions_only():
    """With `positions: rope` there is no position table, and shifting every position by
    the same amount changes nothing (attention sees only differences)."""
    # large weights: sharp attention, so positions matter to the output
    m = preset("bert_tiny", vocab_size=50, positions="rope", max_seq_len=64, init_std=0.3)
    enc = make_encoder(m)
    assert enc.pos_embed is None
    abstract = nnx.state(nnx.eval_shape(lambda: Encoder(m, rngs=nnx.Rngs(0))), nnx.Param)
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(abstract)) == encoder_params(m)
    tokens = jnp.asarray(np.random.default_rng(0).integers(5, 50, (2, 10)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
    np.testing.assert_allclose(enc(tokens, positions_BL=pos), enc(tokens, positions_BL=pos + 7),
                               atol=1e-4)  # fmt: skip
    assert not np.allclose(enc(tokens), enc(tokens[:, ::-1])[:, ::-1], atol=1e-3)


def test_mean_pooling_is_the_mean_over_real_tokens():
    """`pooling: mean`: the head reads the numpy mean of the final features over each row's
    non-padding positions (padding neither counted nor able to change it); `cls` (the
    default) reads the pooler over `[CLS]`, as before."""
    from jaxllm.models.heads import mean_pool

    m = preset("bert_tiny", vocab_size=100)
    enc = make_encoder(m)
    tokens = jnp.array([[2, 10, 11, 12, 3, 0, 0, 0], [2, 20, 21, 22, 23, 24, 25, 3]])
    seg = (tokens != 0).astype(jnp.int32)
    x = np.asarray(enc(tokens, segment_ids_BL=seg), np.float64)
    want = np.stack([x[0, :5].mean(axis=0), x[1].mean(axis=0)])
    np.testing.assert_allclose(mean_pool(jnp.asarray(x), seg), want, atol=1e-5)
    np.testing.assert_allclose(mean_pool(jnp.asarray(x), None), x.mean(axis=1), atol=1e-5)
    assert np.all(np.asarray(mean_pool(jnp.asarray(x), jnp.zeros_like(seg))) == 0)

    rngs = nnx.Rngs(params=0)
    mean = ClassifierModel(enc, 3, rngs=rngs, pooling="mean")
    head = mean.head
    logits = mean(tokens, segment_ids_BL=seg)
    np.testing.assert_allclose(logits, want @ head.kernel[...] + head.bias[...], atol=1e-5)
    noisy = mean(tokens.at[0, 6].set(77), segment_ids_BL=seg)  # padding: invisible
    np.testing.assert_allclose(noisy, logits, atol=1e-5)
    cls = ClassifierModel(enc, 3, rngs=nnx.Rngs(params=0))
    assert cls.pooling == "cls"
    want_cls = np.asarray(enc.pooled(jnp.asarray(x, jnp.float32))) @ cls.head.kernel[...]
    np.testing.assert_allclose(cls(tokens, segment_ids_BL=seg), want_cls + cls.head.bias[...],
                               atol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="pooling"):
        ClassifierModel(enc, 3, rngs=rngs, pooling="max")
