"""Pure token-sampling functions: greedy, temperature, top-k and top-p (nucleus).

Filters apply in the order HF transformers uses: temperature, then top-k, then top-p.
Every setting may be a Python number or a traced scalar, so one compiled program serves any
temperature, top-k and top-p. `token_logprobs` gives the log-prob of a token under the
tempered distribution it was drawn from (logits / temperature, before top-k / top-p).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.models.logits import temper

_NEG = -jnp.inf


def _is_const(x, value: float) -> bool:
    return isinstance(x, int | float) and x == value


def filter_logits(
    logits_BV: jax.Array, top_k: int | jax.Array = 0, top_p: float | jax.Array = 1.0
) -> jax.Array:
    """Logits outside the top-k set, then outside the top-p nucleus, set to -inf.

    top-k keeps the k largest (ties with the k-th kept, as HF does; 0 = off). top-p then keeps
    the smallest set of the most likely remaining tokens whose renormalised probability sums
    to >= p, always at least the most likely one (ties break towards lower ids). One sort
    serves both, and both may be traced values.
    """
    vocab = logits_BV.shape[-1]
    order_BV = jnp.argsort(-logits_BV, axis=-1, stable=True)
    sorted_BV = jnp.take_along_axis(logits_BV, order_BV, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth_B1 = jax.lax.dynamic_slice_in_dim(sorted_BV, k - 1, 1, axis=-1)
    sorted_BV = jnp.where(sorted_BV >= kth_B1, sorted_BV, _NEG)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    keep_sorted_BV = (mass_before_BV < top_p) & (sorted_BV > _NEG)
    keep_sorted_BV = keep_sorted_BV.at[:, 0].set(True)
    rows_B1 = jnp.arange(logits_BV.shape[0])[:, None]
    keep_BV = jnp.zeros_like(keep_sorted_BV).at[rows_B1, order_BV].set(keep_sorted_BV)
    return jnp.where(keep_BV, logits_BV, _NEG)


def sample_logits(
    logits_BV: jax.Array,
    key: jax.Array,
    temperature: float | jax.Array = 1.0,
    top_k: int | jax.Array = 0,
    top_p: float | jax.Array = 1.0,
) -> jax.Array:
    """One token id per row [B] (int32). `temperature == 0` is greedy (argmax); `top_k == 0`
    and `top_p >= 1` switch those filters off. With Python numbers, unused branches are not
    compiled; traced values compile every branch once and select at run time."""
    logits_BV = logits_BV.astype(jnp.float32)
    greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    if _is_const(temperature, 0.0):
        return greedy_B
    scaled_BV = temper(logits_BV, temperature)
    if not (_is_const(top_k, 0) and isinstance(top_p, int | float) and top_p >= 1.0):
        scaled_BV = filter_logits(scaled_BV, top_k, top_p)
    sampled_B = jax.random.categorical(key, scaled_BV, axis=-1).astype(jnp.int32)
    if isinstance(temperature, int | float):
        return sampled_B
    return jnp.where(temperature == 0, greedy_B, sampled_B)


def token_logprobs(
    logits_V: jax.Array, tokens: jax.Array, temperature: float | jax.Array = 1.0
) -> jax.Array:
    """log softmax(logits / temperature)[token] in float32, for logits [..., V] and tokens
    [...]: the log-probability under the distribution the token was sampled from at that
    temperature, before top-k / top-p filtering (what policy-gradient RL needs: the learner
    divides its logits by the same temperature). Temperature 1: the raw model's."""
    logp_V = jax.nn.log_softmax(temper(logits_V, temperature), axis=-1)
    return jnp.take_along_axis(logp_V, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
