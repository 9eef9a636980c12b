"""PEFT methods on the BERT encoder through `ClassifierModel` (what `stage: classify` trains):
adapters before the post-LN LayerNorms start at the base model, prefix/prompt slots leave
padding unseen and `[CLS]` at column 0, a few training steps move only the method's
variables and the head, and the saved variables restored onto a fresh base give the
trained logits."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxllm.config import PeftConfig, from_dict
from jaxllm.models.encoder import make_encoder
from jaxllm.models.heads import ClassifierModel
from jaxllm.models.peft import PEFT_METHODS, apply_peft
from jaxllm.trainers.lm import trainable_filter
from jaxllm.training.checkpoint import Checkpointer

BERT = dataclasses.replace(
    from_dict({"stage": "pretrain", "model": {"preset": "bert_tiny"}}).model,
    vocab_size=100, d_model=32, n_heads=2, d_ff=64, max_seq_len=16,
)  # fmt: skip
TOKENS = jnp.array([[2, 10, 11, 12, 3, 0, 0, 0], [2, 15, 16, 3, 0, 0, 0, 0]])
SEG = (TOKENS != 0).astype(jnp.int32)
LABELS = jnp.array([0, 2])
METHODS = {
    "adapter": PeftConfig("adapter", adapter_dim=4),
    "prefix": PeftConfig("prefix", num_virtual_tokens=3, prefix_projection=True, prefix_hidden=8),
    "prompt": PeftConfig("prompt", num_virtual_tokens=3),
}


def classifier(peft: PeftConfig | None, seed: int = 1) -> ClassifierModel:
    model = ClassifierModel(make_encoder(BERT), 3, rngs=nnx.Rngs(0))
    if peft is not None:
        with nnx.use_eager_sharding(False):
            apply_peft(model, peft, nnx.Rngs(seed))
    return model


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, tokens_BL, seg_BL):
    return nnx.merge(graphdef, state)(tokens_BL, segment_ids_BL=seg_BL)


def logits(model, tokens_BL=TOKENS, seg_BL=SEG) -> jax.Array:
    return _logits(*nnx.split(model), tokens_BL, seg_BL)


@pytest.mark.slow
def test_adapters_start_exactly_at_the_base_classifier():
    # eager: one compiled program per op, so the extra zero adds cannot change how XLA fuses
    # the LayerNorms around them (compiled, the two programs differ by ~1e-8)
    want = classifier(None)(TOKENS, segment_ids_BL=SEG)
    model = classifier(METHODS["adapter"])
    assert model.encoder.blocks[0].attn_adapter is not None
    np.testing.assert_array_equal(model(TOKENS, segment_ids_BL=SEG), want)
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, PEFT_METHODS["adapter"].variable)))
    assert n == BERT.n_layers * 2 * (2 * 32 * 4 + 32 + 4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["prefix", "prompt"])
def test_padding_stays_unseen_and_cls_stays_first(name):
    model = classifier(METHODS[name])
    want = logits(model)
    assert float(jnp.abs(want - logits(classifier(None))).max()) > 0  # not the base outputs
    np.testing.assert_allclose(logits(model, TOKENS.at[0, 6].set(77)), want, atol=1e-6)
    np.testing.assert_allclose(logits(model, TOKENS[:, :5], SEG[:, :5]), want, atol=1e-6)
    x_BLD = jax.eval_shape(lambda: model.encoder(TOKENS, segment_ids_BL=SEG))
    assert x_BLD.shape == (2, 8, 32)  # the real tokens' columns only


def train(model, peft: PeftConfig, steps: int = 5):
    """A few Adam steps on the method's variables and the head (the stage's split)."""
    graphdef, params, frozen = nnx.split(model, trainable_filter(peft), ...)
    tx = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state):
        def loss(params):
            out = nnx.merge(graphdef, params, frozen)(TOKENS, segment_ids_BL=SEG)
            return optax.softmax_cross_entropy_with_integer_labels(out, LABELS).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    opt_state, losses = tx.init(params), []
    for _ in range(steps):
        params, opt_state, value = step(params, opt_state)
        losses.append(float(value))
    return nnx.merge(graphdef, params, frozen), losses


@pytest.mark.parametrize("name", ["adapter", "prefix", "prompt"])
def test_training_moves_only_the_method_and_restores_onto_a_fresh_base(tmp_path, name):
    peft = METHODS[name]
    base = nnx.state(classifier(None).encoder)
    model, losses = train(classifier(peft), peft)
    assert losses[-1] < losses[0]
    method = PEFT_METHODS[peft.method]
    kept = nnx.state(model.encoder, nnx.Not(method.variable))
    for (pa, a), (pb, b) in zip(nnx.to_flat_state(kept), nnx.to_flat_state(base), strict=True):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))
    # a checkpoint of what trained (the method and the head) onto a fresh base + method
    trained = nnx.state(model, trainable_filter(peft))
    owners = {p[:2] if p[0] == "encoder" else p[:1] for p, _ in nnx.to_flat_state(trained)}
    assert owners == {("head",), ("encoder", "blocks" if name == "adapter" else name)}
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(5, {"params": trained}, {"step": 5})
    names = {k for k in str(ckpt.manager.item_metadata(5)["state"]).split("'") if "." not in k}
    assert not names & {"q", "k", "pooler", "pos_embed", "scale"} and "kernel" in names
    fresh = classifier(peft, seed=7)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.state(fresh, trainable_filter(peft))
    )
    restored, _ = ckpt.restore_params(5, target)
    ckpt.close()
    nnx.update(fresh, restored)
    np.testing.assert_array_equal(logits(fresh), logits(model))


# A rope encoder (no position table): the merge of the encoder's positions with PEFT.
ROPE = dataclasses.replace(BERT, positions="rope", init_std=0.2)
ROPE_METHODS = {"lora": PeftConfig("lora", rank=2, alpha=4.0), **METHODS}


def rope_classifier(peft: PeftConfig | None, seed: int = 1) -> ClassifierModel:
    model = ClassifierModel(make_encoder(ROPE), 3, rngs=nnx.Rngs(0))
    if peft is not None:
        with nnx.use_eager_sharding(False):
            apply_peft(model, peft, nnx.Rngs(seed))
    return model


@pytest.mark.parametrize("name", ["lora", "adapter"])
def test_zero_init_methods_start_exactly_at_a_rope_encoder(name):
    want = rope_classifier(None)(TOKENS, segment_ids_BL=SEG)  # eager, as above
    got = rope_classifier(ROPE_METHODS[name])(TOKENS, segment_ids_BL=SEG)
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_rope_prompt_tokens_sit_at_minus_p_like_the_decoder():
    """Prompt tuning on a rope encoder equals the base encoder run on the virtual tokens as
    real tokens at positions -P..-1 before the row (type embedding 0 zeroed, so the only
    difference left would be the positions): the real tokens keep 0..L-1."""
    model = rope_classifier(METHODS["prompt"])
    enc = model.encoder
    enc.type_embed[...] = enc.type_embed[...].at[0].set(0.0)
    virtual = jnp.array([40, 41, 42])
    enc.prompt.embedding[...] = enc.embed.embedding[...][virtual]
    tokens = TOKENS[:, :4]  # no padding: the virtual tokens see every column either way
    got = enc(tokens)
    p = virtual.shape[0]
    row = jnp.concatenate([jnp.broadcast_to(virtual, (2, p)), tokens], axis=1)
    pos = jnp.broadcast_to(jnp.arange(-p, 4, dtype=jnp.int32), (2, p + 4))
    prompt, enc.prompt = enc.prompt, None
    want = enc(row, positions_BL=pos)[:, p:]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    shifted = enc(row, positions_BL=pos + p)[:, p:]  # the virtual tokens at 0..P-1 instead
    assert float(jnp.abs(got - shifted).max()) < 1e-4  # rope: only differences matter
    enc.prompt = prompt
    real_at_p = enc(tokens, positions_BL=jnp.broadcast_to(jnp.arange(p, p + 4), (2, 4)))
    assert float(jnp.abs(got - real_at_p).max()) > 1e-3  # so positions are not ignored


def test_rope_prefix_keys_are_not_rotated(monkeypatch):
    """RoPE turns the real tokens' queries and keys only: the prefix keys enter the scores as
    stored (as in the decoder, and as a HF cache's keys), so they sit at RoPE's position 0
    and a common shift of the real positions changes what the tokens see of them."""
    from jaxllm.models import attention

    rotated = []
    real = attention.apply_rope
    monkeypatch.setattr(
        attention, "apply_rope", lambda x, rope: rotated.append(x.shape) or real(x, rope)
    )
    enc = rope_classifier(METHODS["prefix"]).encoder
    a = enc(TOKENS, segment_ids_BL=SEG)
    assert rotated and all(shape[1] == TOKENS.shape[1] for shape in rotated)  # L, never P + L
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    b = enc(TOKENS, segment_ids_BL=SEG, positions_BL=pos + 5)
    assert float(jnp.abs(a - b).max()) > 1e-4
    base = rope_classifier(None).encoder  # without the prefix a shift changes nothing
    np.testing.assert_allclose(
        base(TOKENS, segment_ids_BL=SEG), base(TOKENS, segment_ids_BL=SEG, positions_BL=pos + 5),
        atol=1e-4,
    )  # fmt: skip


@pytest.mark.parametrize("name", ["lora", "adapter", "prefix", "prompt"])
def test_training_a_rope_encoder_moves_only_the_method(name):
    peft = ROPE_METHODS[name]
    base = nnx.state(rope_classifier(None).encoder)
    model, losses = train(rope_classifier(peft), peft)
    assert losses[-1] < losses[0]
    kept = nnx.state(model.encoder, nnx.Not(PEFT_METHODS[peft.method].variable))
    for (pa, a), (pb, b) in zip(nnx.to_flat_state(kept), nnx.to_flat_state(base), strict=True):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))


@pytest.mark.slow  # 5-7 s each on the loaded VM; the fast suite is at its 10-minute edge
@pytest.mark.parametrize("name", ["prefix", "prompt"])
def test_mean_pooling_reads_the_real_tokens_and_reaches_the_method(name):
    """The shipped classifier (`pooling: mean`, rope, plain prefixes/prompts): the head reads
    the numpy mean of the real tokens' features (virtual slots and padding left out), and
    the loss has a nonzero gradient on the method's variables through that mean."""
    peft = dataclasses.replace(METHODS[name], prefix_projection=False)
    model = ClassifierModel(make_encoder(ROPE), 3, rngs=nnx.Rngs(0), pooling="mean")
    with nnx.use_eager_sharding(False):
        apply_peft(model, peft, nnx.Rngs(1))
    x_BLD = np.asarray(model.encoder(TOKENS, segment_ids_BL=SEG), np.float64)
    real_BL = np.asarray(SEG, np.float64)
    pooled_BD = (x_BLD * real_BL[..., None]).sum(1) / real_BL.sum(1, keepdims=True)
    head = model.head
    want = pooled_BD @ np.asarray(head.kernel[...], np.float64) + np.asarray(head.bias[...])
    got = logits(model)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(logits(model, TOKENS.at[0, 6].set(77)), got, atol=1e-6)
    graphdef, params, frozen = nnx.split(model, PEFT_METHODS[peft.method].variable, ...)

    def loss(params):
        out = nnx.merge(graphdef, params, frozen)(TOKENS, segment_ids_BL=SEG)
        return optax.softmax_cross_entropy_with_integer_labels(out, LABELS).mean()

    grads = jax.grad(loss)(params)
    norm = float(optax.tree.norm(grads))
    assert np.isfinite(norm) and norm > 1e-4
