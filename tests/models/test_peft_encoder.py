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


def test_adapters_start_exactly_at_the_base_classifier():
    # eager: one compiled program per op, so the extra zero adds cannot change how XLA fuses
    # the LayerNorms around them (compiled, the two programs differ by ~1e-8)
    want = classifier(None)(TOKENS, segment_ids_BL=SEG)
    model = classifier(METHODS["adapter"])
    assert model.encoder.blocks[0].attn_adapter is not None
    np.testing.assert_array_equal(model(TOKENS, segment_ids_BL=SEG), want)
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, PEFT_METHODS["adapter"].variable)))
    assert n == BERT.n_layers * 2 * (2 * 32 * 4 + 32 + 4)


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
