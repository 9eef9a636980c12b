"""The jitted scorer: per-token log-probs of right-padded token rows under a model, and the
batching loop that scores continuations given contexts (what `stage: score`, `stage: eval`
and the lm-evaluation-harness bridge run).

A row of L tokens runs through the model once, without its last token (nothing is predicted
from it), so a row can be one token longer than the model's context; position t >= 1 gets
log p(token t | tokens < t). The model's input is padded to a bucket (the next power of two
>= 16, capped at the context), so the scorer compiles once per bucket and batch size.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxllm.sharding import use_rules
from jaxllm.sharding.batch import map_rows


def _logp_greedy(graphdef, state, tokens_BL, mask_BL, mesh, rules):
    """([B, L] log p(token t | < t), [B, L] whether token t is the argmax), 0 / False at
    t = 0 and on padding."""
    with use_rules(mesh, rules) if mesh is not None else contextlib.nullcontext():
        model = nnx.merge(graphdef, state)
        logits_BLV = model(tokens_BL[:, :-1], segment_ids_BL=mask_BL[:, :-1].astype(jnp.int32))
    logp_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
    picked_BL = jnp.take_along_axis(logp_BLV, tokens_BL[:, 1:, None], axis=-1)[..., 0]
    real_BL = mask_BL[:, 1:] > 0
    picked_BL = jnp.where(real_BL, picked_BL, 0.0)
    greedy_BL = real_BL & (jnp.argmax(logp_BLV, axis=-1) == tokens_BL[:, 1:])
    return jnp.pad(picked_BL, ((0, 0), (1, 0))), jnp.pad(greedy_BL, ((0, 0), (1, 0)))


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "rules"))
def score_batch(
    graphdef: nnx.GraphDef, state: nnx.State, tokens_BL, mask_BL, mesh: Mesh | None = None,
    rules: str = "dp",
) -> jax.Array:  # fmt: skip
    """[B, L] float32: log p(token t | tokens < t) at t >= 1 of real tokens, 0 elsewhere
    (under the logical-axis `rules` on `mesh` when given)."""
    return _logp_greedy(graphdef, state, tokens_BL, mask_BL, mesh, rules)[0]


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh", "rules"))
def score_greedy_batch(
    graphdef: nnx.GraphDef, state: nnx.State, tokens_BL, mask_BL, mesh: Mesh | None = None,
    rules: str = "dp",
) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """`score_batch` plus [B, L] bool: whether each token is the model's argmax (lm-eval's
    `is_greedy`)."""
    return _logp_greedy(graphdef, state, tokens_BL, mask_BL, mesh, rules)


def bucket_len(n: int, max_len: int, minimum: int = 16) -> int:
    return min(max_len, max(minimum, 1 << (max(n, 1) - 1).bit_length()))


def row_len(n: int, max_len: int) -> int:
    """The padded length of scorer rows of up to `n` tokens: the model reads all but the
    last, `bucket_len(n - 1)` tokens (at most `max_len`, the context)."""
    return bucket_len(n - 1, max_len) + 1


class Continuation(NamedTuple):
    """A scored continuation: sum of its tokens' log-probs, whether every one of them is the
    argmax, and the per-token log-probs."""

    logprob: float
    greedy: bool
    logprobs: list[float]


def score_continuations(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int,
    max_len: int,
    mesh: Mesh | None = None,
    rules: str = "dp",
) -> list[Continuation]:
    """Scores each continuation given its context: (context ids, continuation ids) rows,
    context first in one row of at most `max_len` + 1 tokens, so the model reads at most
    `max_len` (the caller cut longer ones; lm-eval's `(context + continuation)[-(max_len +
    1):][:-1]`). Similar lengths batch together; on a mesh each batch is split over its data
    axes and every process gets every result. The context must be non-empty (a BOS at least)."""
    for ctx, cont in rows:
        if not ctx or not cont or len(ctx) + len(cont) > max_len + 1:
            raise ValueError(f"need 1 <= context, 1 <= continuation, total <= {max_len + 1} tokens")
    full = [list(c) + list(x) for c, x in rows]
    order = sorted(range(len(full)), key=lambda i: len(full[i]))
    out: list[Continuation | None] = [None] * len(full)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        length = row_len(max(len(full[i]) for i in idx), max_len)
        tokens = np.zeros((batch_size, length), np.int32)
        mask = np.zeros((batch_size, length), np.int32)
        for j, i in enumerate(idx):
            tokens[j, : len(full[i])], mask[j, : len(full[i])] = full[i], 1
        logp, greedy = _run(graphdef, state, {"tokens": tokens, "mask": mask}, mesh, rules)
        for j, i in enumerate(idx):
            span = slice(len(rows[i][0]), len(full[i]))
            lp = logp[j, span]
            out[i] = Continuation(float(lp.sum(dtype=np.float64)), bool(greedy[j, span].all()),
                                  [float(x) for x in lp])  # fmt: skip
    return out  # type: ignore[return-value]


def _run(graphdef, state, batch: dict[str, np.ndarray], mesh, rules: str):
    """`score_greedy_batch` of a host batch: split over the mesh, all rows back everywhere."""
    if mesh is None:
        out = score_greedy_batch(graphdef, state, batch["tokens"], batch["mask"])
        return tuple(np.asarray(x) for x in out)
    return map_rows(
        lambda b: score_greedy_batch(graphdef, state, b["tokens"], b["mask"], mesh, rules),
        batch, mesh, rules,
    )  # fmt: skip
