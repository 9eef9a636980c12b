"""The compiled programs of continuous batching: a fixed number of decode slots (rows of one
KV cache, each at its own length) that requests join and leave between decode steps.

- `prefill`: R right-padded prompts of one length bucket through the model into a fresh
  R-row cache, copied into chosen slots of the big cache, each slot's write index at its
  prompt's end; samples each row's first token (its logits read at the row's last real
  token). Padding rows name a slot past the last: dropped. One program per bucket and R.
- `decode_step`: ONE program for every step: feeds each slot's last token at its own cache
  slot and samples the next one, per-slot temperature / top-p / seed. Free slots run too
  (fixed shapes) but see and change nothing that matters: their segment is 0.

Weights are an argument of every program (`state` from `nnx.split`), so one engine serves
fresh weights (an RL loop) without recompiling. Token log-probs are the raw model's
(log_softmax of the logits, temperature 1), with the `top_n` most likely ids beside them
(what OpenAI's `logprobs` reports).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class RowParams(NamedTuple):
    """Per-row sampling settings (host arrays, [B]): temperature (0: greedy), top-p, the
    row's key data [B, 2] and how many tokens it has drawn (folded into its key)."""

    temperature: np.ndarray
    top_p: np.ndarray
    key_data: np.ndarray
    drawn: np.ndarray


class Picked(NamedTuple):
    """Per row: the drawn token, its log-prob, the `top_n` most likely ids and log-probs."""

    token: jax.Array
    logprob: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


def seed_key_data(seed: int) -> np.ndarray:
    """The raw data of a sampling key for any integer seed in [0, 2**64): `jax.random.key`
    (32-bit without x64) for seeds below 2**32, the high bits folded in above, so seeds
    that differ only there draw differently."""
    seed = int(seed) % 2**64
    key = jax.random.key(seed % 2**32)
    if seed >= 2**32:
        key = jax.random.fold_in(key, seed >> 32)
    return np.asarray(jax.random.key_data(key), np.uint32)


CHOICE_TAG = 0x63686F69  # "choi": marks a key derived for a request's further draws


def choice_key_data(seed: int, choice: int = 0) -> np.ndarray:
    """The key data of draw `choice` of a request seeded with `seed`: choice 0 is the seed's
    own key (`seed_key_data`); choice k > 0 folds in CHOICE_TAG then k. Two folds more than
    any seed's key has, so no choice's key is another seed's: requests with neighbouring
    seeds draw independently, and one with the same seed and n draws the same again."""
    data = seed_key_data(seed)
    if not choice:
        return data
    key = jax.random.wrap_key_data(data)
    key = jax.random.fold_in(jax.random.fold_in(key, CHOICE_TAG), int(choice))
    return np.asarray(jax.random.key_data(key), np.uint32)


def row_params(temperature, top_p, seeds, drawn) -> RowParams:
    """RowParams from per-row lists; each seed becomes its key's raw data (`seed_key_data`)."""
    keys = np.stack([seed_key_data(s) for s in seeds])
    return RowParams(
        np.asarray(temperature, np.float32),
        np.asarray(top_p, np.float32),
        keys.astype(np.uint32),
        np.asarray(drawn, np.int32),
    )


def nucleus(scaled_BV: jax.Array, top_p_B1: jax.Array) -> jax.Array:
    """Logits outside each row's top-p nucleus set to -inf: the most likely tokens whose
    probabilities sum to >= p (ties with the last one kept). A value sort and a threshold,
    no scatter back: it compiles in a fraction of `filter_logits`' time."""
    sorted_BV = -jnp.sort(-scaled_BV, axis=-1)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    keep_B = jnp.sum(jnp.cumsum(probs_BV, axis=-1) - probs_BV < top_p_B1, axis=-1)
    cut_B1 = jnp.take_along_axis(sorted_BV, jnp.maximum(keep_B, 1)[:, None] - 1, axis=-1)
    return jnp.where(scaled_BV >= cut_B1, scaled_BV, -jnp.inf)


def _pick(logits_BV: jax.Array, p: RowParams, top_n: int) -> Picked:
    """One token per row with its own settings: argmax where temperature is 0, else a draw
    from softmax(logits / T) within the top-p nucleus, keyed by (row key, tokens drawn)."""
    logits_BV = logits_BV.astype(jnp.float32)
    temp_B = jnp.asarray(p.temperature)
    scaled_BV = logits_BV / jnp.where(temp_B > 0, temp_B, 1.0)[:, None]
    top_p_B1 = jnp.asarray(p.top_p)[:, None]
    scaled_BV = jax.lax.cond(
        jnp.any(top_p_B1 < 1.0), lambda x: nucleus(x, top_p_B1), lambda x: x, scaled_BV
    )
    keys_B = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(p.key_data), p.drawn)
    drawn_B = jax.vmap(jax.random.categorical)(keys_B, scaled_BV).astype(jnp.int32)
    tok_B = jnp.where(temp_B > 0, drawn_B, jnp.argmax(logits_BV, axis=-1).astype(jnp.int32))
    logp_BV = jax.nn.log_softmax(logits_BV, axis=-1)
    top_logp_BN, top_ids_BN = jax.lax.top_k(logp_BV, top_n)
    logp_B = jnp.take_along_axis(logp_BV, tok_B[:, None], axis=-1)[:, 0]
    return Picked(tok_B, logp_B, top_ids_BN.astype(jnp.int32), top_logp_BN)


def _put_rows(big, small, slots_R):
    """`small`'s rows [R, ..., P, ...] written into rows `slots_R` of `big` at slots [0, P)
    (the slot axis is -2 for k / v [B, K, S, H], -1 for segment ids [B, S])."""
    if isinstance(big, tuple):
        return tuple(_put_rows(b, s, slots_R) for b, s in zip(big, small, strict=True))
    if big.ndim == 5:  # stacked layers [N, B, K, S, H]
        return jax.vmap(_put_rows, in_axes=(0, 0, None))(big, small, slots_R)
    p = small.shape[-2] if big.ndim == 4 else small.shape[-1]
    at = (slots_R, slice(None), slice(0, p)) if big.ndim == 4 else (slots_R, slice(0, p))
    return big.at[at].set(small.astype(big.dtype), mode="drop")


def _insert(cache, new, slots_R):
    """`cache` with prefilled rows `new` in slots `slots_R` (an index >= B: dropped), each
    slot's segment ids cleared past its prompt and its write index (per row) at its
    prompt's end."""
    seg = cache.segment_ids.at[slots_R].set(0, mode="drop")
    return cache.replace(
        k=_put_rows(cache.k, new.k, slots_R),
        v=_put_rows(cache.v, new.v, slots_R),
        segment_ids=_put_rows(seg, new.segment_ids, slots_R),
        index=cache.index.at[slots_R].set(new.index, mode="drop"),
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "top_n"), donate_argnames=("cache",))
def prefill(graphdef: nnx.GraphDef, state: nnx.State, cache, tokens_RP, lens_R, slots_R,
            params: RowParams, *, top_n: int):  # fmt: skip
    """Right-padded prompts [R, P] (real lengths `lens_R`) through the model into a fresh
    R-row cache, copied into slots `slots_R` of `cache`; returns (cache, Picked: each row's
    first token, its logits read at the row's last real token)."""
    r, p = tokens_RP.shape
    model = nnx.merge(graphdef, state)
    new = model.init_cache(r, p)
    slots_P = jnp.arange(p, dtype=jnp.int32)
    seg_RP = (slots_P[None, :] < lens_R[:, None]).astype(jnp.int32)
    pos_RP = jnp.broadcast_to(slots_P, (r, p))
    logits_R1V, new = model.extend(
        tokens_RP, new, positions_BL=pos_RP, segment_ids_BL=seg_RP, at_B=lens_R - 1
    )
    # each row's write index: after the virtual slots (PEFT) and its real prompt tokens
    new = new.replace(index=new.index - p + lens_R)
    return _insert(cache, new, slots_R), _pick(logits_R1V[:, 0], params, top_n)


@functools.partial(jax.jit, static_argnames=("graphdef", "top_n"), donate_argnames=("cache",))
def decode_step(graphdef: nnx.GraphDef, state: nnx.State, cache, tok_B, pos_B, live_B,
                params: RowParams, *, top_n: int):  # fmt: skip
    """One token for every live slot: (cache, Picked). A live slot's token is written at
    its own write index (then advanced); a free slot's index stays where it is."""
    model = nnx.merge(graphdef, state)
    seg_B1 = live_B.astype(jnp.int32)[:, None]
    logits_B1V, new_cache = model.extend(
        tok_B[:, None], cache, positions_BL=pos_B[:, None], segment_ids_BL=seg_B1
    )
    new_cache = new_cache.replace(index=jnp.where(live_B, new_cache.index, cache.index))
    return new_cache, _pick(logits_B1V[:, 0], params, top_n)


def empty_cache(graphdef: nnx.GraphDef, state: nnx.State, slots: int, size: int):
    """A `slots`-row cache of `size` slots (after any PEFT virtual slots), per-row index."""

    @jax.jit
    def make(state):
        return nnx.merge(graphdef, state).init_cache(slots, size).with_row_index()

    return make(state)
