"""GRPO advantages flow: equal rewards in a group give zero advantage and so zero policy
gradient (only the KL term, beta > 0, still pulls); a better-than-average completion does not."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.models import Decoder
from jaxllm.trainers.advantages import group_advantages
from jaxllm.trainers.grpo import grpo_loss_fn
from jaxllm.training.losses import token_logprobs

B, L = 4, 12


def _batch(rewards, model):
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 50, (B, L)).astype(np.int32)
    mask = np.zeros((B, L), np.float32)
    mask[:, 4:9] = 1.0
    batch = dict(
        tokens=tokens, targets=np.roll(tokens, -1, 1), mask=mask,
        segment_ids=np.ones((B, L), np.int32),
        positions=np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)),
    )  # fmt: skip
    logits = _forward(nnx.state(model), jnp.asarray(tokens))
    logp = np.asarray(token_logprobs(logits, jnp.asarray(batch["targets"])))
    batch.update(old_logp=logp, ref_logp=logp - 0.1 * mask, adv=np.asarray(group_advantages(
        jnp.asarray(rewards, jnp.float32), B)))  # fmt: skip
    return {k: jnp.asarray(v) for k, v in batch.items()}


@functools.cache
def _model():
    m = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=32)
    return Decoder(m, rngs=nnx.Rngs(0))


@jax.jit
def _forward(state, tokens):
    return nnx.merge(nnx.graphdef(_model()), state)(tokens)


@functools.cache
def _grad_fn(beta):
    """The jitted gradient of GRPO's loss (one compile per beta, not one dispatch per op)."""
    loss_fn = grpo_loss_fn(0.2, beta, "k3")
    graphdef = nnx.graphdef(_model())
    return jax.jit(jax.grad(lambda p, batch: loss_fn(nnx.merge(graphdef, p), batch, None)[0]))


def _grad_norm(beta, rewards):
    model = _model()
    grads = _grad_fn(beta)(nnx.state(model), _batch(rewards, model))
    return float(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))) ** 0.5


def test_equal_rewards_give_zero_policy_gradient():
    assert _grad_norm(0.0, [1.0, 1.0, 1.0, 1.0]) == 0.0
    assert _grad_norm(0.0, [0.0, 0.0, 0.0, 0.0]) == 0.0
    assert _grad_norm(0.1, [1.0, 1.0, 1.0, 1.0]) > 0.0  # the KL term alone


def test_different_rewards_give_a_gradient():
    assert _grad_norm(0.0, [1.0, 0.0, 0.0, 0.0]) > 1e-6
