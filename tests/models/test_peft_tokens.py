"""Trainable tokens beside LoRA (`peft.trainable_tokens`): a zero start, outputs equal to a
model whose embedding rows / head columns were changed by numpy, merging, gradients that
reach only the chosen rows (plain and fused loss), and one-line errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxllm.config import ModelConfig, PeftConfig, from_dict
from jaxllm.errors import ConfigError
from jaxllm.models import make_decoder
from jaxllm.models.peft import apply_peft, merge_peft, methods_in
from jaxllm.trainers.checkpoint_model import peft_token_ids, trainable_filter
from jaxllm.trainers.lm import lm_loss

SMALL = ModelConfig(
    vocab_size=61, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=32,
    positions="rope", norm="rmsnorm", mlp="swiglu",
)  # fmt: skip
IDS = (58, 59, 60, 7)
PEFT = PeftConfig("lora", 2, 4.0, targets=(r"mlp\.up$",), trainable_tokens=("a", "b", "c", "d"))


def adapted(tied: bool, scan: bool = False):
    m = dataclasses.replace(SMALL, tie_embeddings=tied, scan_layers=scan)
    model = make_decoder(m, seed=0)
    with nnx.use_eager_sharding(False):
        apply_peft(model, PEFT, nnx.Rngs(1), IDS)
    return model


def randomize(model, seed=2):
    tt = model.trainable_tokens
    for i, var in enumerate(v for v in (tt.embed_delta, tt.head_delta) if v is not None):
        var[...] = jax.random.normal(jax.random.key(seed + i), var.shape)


TOKENS = np.array([[1, 58, 7, 59, 3, 60, 60, 12], [7, 7, 2, 5, 59, 58, 0, 4]], np.int32)


@pytest.mark.parametrize("tied,scan", [(True, False), (False, False), (False, True)])
def test_deltas_start_at_zero_and_merge_as_numpy_rows(tied, scan):
    model = adapted(tied, scan)
    plain = make_decoder(dataclasses.replace(SMALL, tie_embeddings=tied, scan_layers=scan))
    np.testing.assert_array_equal(model(TOKENS), plain(TOKENS))  # zeros: the base model
    randomize(model)
    got = np.asarray(model(TOKENS))
    # independent: the same base with E[ids] += delta (and W[:, ids] += head delta) by numpy
    tt = model.trainable_tokens
    emb = np.array(plain.embed.embedding[...], np.float64)
    delta = np.asarray(tt.embed_delta[...], np.float64)
    for k, i in enumerate(IDS):
        emb[i] += delta[k]
    plain.embed.embedding[...] = jnp.asarray(emb, jnp.float32)
    if not tied:
        head = np.array(plain.head[...], np.float64)
        head[:, list(IDS)] += np.asarray(tt.head_delta[...], np.float64)
        plain.head[...] = jnp.asarray(head, jnp.float32)
    # the LoRA adapter on mlp.up has B = 0: plain differs from the adapted model only there
    np.testing.assert_allclose(got, np.asarray(plain(TOKENS)), atol=1e-5)
    assert np.abs(got - np.asarray(make_decoder(plain.cfg)(TOKENS))).max() > 0.1
    # the fused loss's output weight is the adapted one
    w_VD = np.asarray(model.output_weight())
    np.testing.assert_allclose(w_VD, emb if tied else head.T, atol=1e-6)
    assert merge_peft(model) == [] and not methods_in(model)
    assert model.trainable_tokens is None
    np.testing.assert_allclose(np.asarray(model(TOKENS)), got, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_only_the_chosen_rows_train_and_the_fused_loss_agrees(tied):
    model = adapted(tied)
    graphdef, params, frozen = nnx.split(model, trainable_filter(PEFT), ...)
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(params)}
    want = {"trainable_tokens.embed_delta"} | (set() if tied else {"trainable_tokens.head_delta"})
    assert {n for n in names if "lora" not in n} == want
    batch = {"tokens": TOKENS, "targets": np.roll(TOKENS, -1, 1), "positions": None,
             "loss_mask": np.ones(TOKENS.shape, np.float32)}  # fmt: skip
    batch["positions"] = np.broadcast_to(np.arange(8, dtype=np.int32), TOKENS.shape)

    def loss(p, chunk):
        return lm_loss(loss_chunk=chunk)(nnx.merge(graphdef, p, frozen), batch, None)[0]

    g_plain = jax.grad(loss)(params, 0)
    g_fused = jax.grad(loss)(params, 4)  # head_cross_entropy over output_weight()
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_fused), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    tx = optax.adam(1e-2)
    opt = tx.init(params)
    for _ in range(3):
        updates, opt = tx.update(jax.grad(loss)(params, 0), opt)
        params = optax.apply_updates(params, updates)
    trained = nnx.merge(graphdef, params, frozen)
    base = make_decoder(trained.cfg)
    e0 = np.asarray(base.embed.embedding[...], np.float64)
    tt = trained.trainable_tokens
    eff = e0.copy()  # the effective embedding: frozen table + scattered delta
    for k, i in enumerate(IDS):
        eff[i] += np.asarray(tt.embed_delta[...], np.float64)[k]
    np.testing.assert_array_equal(trained.embed.embedding[...], base.embed.embedding[...])
    others = np.setdiff1d(np.arange(SMALL.vocab_size), IDS)
    np.testing.assert_array_equal(eff[others], e0[others])
    assert np.abs(eff[list(IDS)] - e0[list(IDS)]).min(axis=1).max() > 0  # every chosen row moved
    assert (np.abs(eff[list(IDS)] - e0[list(IDS)]).max(axis=1) > 1e-3).all()
    if not tied:
        assert (np.abs(np.asarray(tt.head_delta[...])).max(axis=0) > 1e-3).all()


def test_token_strings_resolve_with_the_tokenizer_or_fail_in_one_line(tok):
    chat = ("<|user|>", "<|end|>")
    ids = peft_token_ids(dataclasses.replace(PEFT, trainable_tokens=chat), tok.path)
    assert ids == tuple(tok.special_ids[t] for t in chat)
    with pytest.raises(
        ConfigError, match=r"'peft\.trainable_tokens': 'hello world' is not a single"
    ):
        peft_token_ids(dataclasses.replace(PEFT, trainable_tokens=("hello world",)), tok.path)
    with pytest.raises(ConfigError, match=r"peft\.trainable_tokens.*method lora only"):
        from_dict({"stage": "sft", "peft": {"method": "prompt", "trainable_tokens": ["<|end|>"]}})
    with (
        pytest.raises(ValueError, match=r"outside the model's vocabulary of 61"),
        nnx.use_eager_sharding(False),
    ):
        apply_peft(make_decoder(SMALL), PEFT, nnx.Rngs(0), (1, 2, 3, 61))
