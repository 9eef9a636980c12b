"""One RL iteration, shared by PPO and GRPO (`rl_loop.run_rl` drives it): `produce`
(rollouts with given weights → a global batch → the stage's rewards) then `learn` (the
jitted scoring pass → `algo.post` → epochs of minibatch steps → the metrics row). The
synchronous loop runs them back to back (`rl_iteration`); `rl_async.py` runs `produce` ahead
in a background thread. The host draws of an iteration (`plan_iteration`) are made in one
fixed order, so both give the same prompts and minibatches for a seed.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxllm.sharding.batch import replicated, row_sharding, rows_to_global
from jaxllm.sharding.multihost import gather_text
from jaxllm.trainers.rl_eval import text_figures
from jaxllm.trainers.rollout import check_gap, minibatches, sample_rollouts, stop_ids

if TYPE_CHECKING:
    from jaxllm.trainers.rl_loop import Algorithm, Stage


@dataclass
class Produced:
    """One iteration's rollouts, ready for the learner: this process's rows (`ro`) and
    prompt records (`mine`), the global batch, the per-row rewards, the sampling seconds and,
    for rollouts sampled with older weights than the learner's, the (mean, max) sampler /
    learner log-prob gap checked at those weights (None: checked by `learn`)."""

    ro: Any
    mine: list[dict]
    batch: dict
    rewards: dict
    seconds: float
    gap: tuple[float, float] | None = None


def plan_iteration(algo: Algorithm, rng: np.random.Generator, s) -> tuple[list[dict], list]:
    """The host draws of one iteration, in the order the synchronous loop has always made
    them: its prompt rows, then the minibatch index arrays of all its epochs."""
    recs = algo.pick(rng)
    return recs, [
        idx for _ in range(s.epochs) for idx in minibatches(len(recs), s.minibatch_size, rng)
    ]


def produce(
    cfg, st: Stage, algo: Algorithm, weights: nnx.State, recs: list[dict], it: int
) -> Produced:
    """Samples this process's rows of `recs` with `weights` (key `fold_in(seed, it)`), lays
    them out as a global batch and scores them with `algo.rewards`."""
    s = getattr(cfg, cfg.stage)
    span = st.sampler.my_rows(len(recs))
    mine = recs[span]
    t0 = time.perf_counter()
    key = jax.random.fold_in(jax.random.key(cfg.seed), it)
    if st.episodes is not None:  # multi-turn, with the environment
        ro = st.episodes(weights, mine, max_new_tokens=s.max_new_tokens, key=key,
                         temperature=s.temperature, first_row=span.start)  # fmt: skip
    else:
        ro = sample_rollouts(
            st.sampler, weights, [r["ids"] for r in mine], st.tok, seq_len=cfg.loader.seq_len,
            max_new_tokens=s.max_new_tokens, key=key, temperature=s.temperature,
            stop_ids=stop_ids(st.template),
        )  # fmt: skip
    seconds = time.perf_counter() - t0
    batch = rows_to_global(ro.batch, st.mesh, st.rules)
    return Produced(ro, mine, batch, algo.rewards(ro.texts, mine, batch), seconds)


def rl_iteration(cfg, st: Stage, algo: Algorithm, state, rng, it: int, clock: dict):
    """One synchronous iteration: rollouts with the current weights, then `learn`."""
    recs, order = plan_iteration(algo, rng, getattr(cfg, cfg.stage))
    got = produce(cfg, st, algo, nnx.merge_state(state.params, state.frozen), recs, it)
    clock["gen"] += got.seconds
    return learn(cfg, st, algo, state, recs, got, order, clock)


def learn(cfg, st: Stage, algo: Algorithm, state, recs, got: Produced, order, clock: dict):
    """Scoring → `algo.post` → epochs of minibatch steps (in `order`) on produced rollouts.
    The metrics row holds the rollouts' text figures too (`eval_rules` rates, degeneration).
    Rollouts from older weights (`got.gap` set) report their checked gap as `logprob_gap`
    and the mean |log π_old − log π_sampler| against the current weights as `policy_shift`."""
    s = getattr(cfg, cfg.stage)
    t1 = time.perf_counter()
    batch = got.batch
    scores = st.score(state.params, state.frozen, st.ref[1], batch)
    fields, stats = algo.post(scores, batch, got.rewards)
    stats = {k: float(v) for k, v in jax.device_get(stats).items()}  # replicated scalars
    if got.gap is None:
        check_gap(stats["logprob_gap"], stats["logprob_gap_max"], s.logprob_tol)
    else:
        stats["policy_shift"] = stats["logprob_gap"]
        stats["logprob_gap"], stats["logprob_gap_max"] = got.gap
    state, row, lr = train_epochs(st, algo.step_fn, state, {**batch, **fields}, order)
    clock["train"] += time.perf_counter() - t1
    clock["tokens"] += int(stats["tokens"])
    row.update(algo.report(stats))
    for key in ("logprob_gap", "logprob_gap_max", "response_length", "policy_shift"):
        if key in stats:
            row[key] = stats[key]
    row["lr"] = lr
    texts = all_texts(got.ro.texts, st.sampler.my_rows(len(recs)))
    row.update(text_figures(texts, recs, st.eval_rules))
    return state, row


def all_texts(texts: list[str], mine: slice) -> list[str]:
    """Every process's decoded rollouts in global row order (this process's `texts` are
    the rows `mine`); no collective in one process."""
    blocks = [json.loads(b) for b in gather_text(json.dumps([mine.start, texts]))]
    return [t for _, block in sorted(blocks, key=lambda b: b[0]) for t in block]


def train_epochs(st: Stage, step_fn, state, full: dict, order: list) -> tuple[Any, dict, float]:
    """Minibatch steps over the rollout rows (gathered on device), one per index array of
    `order` (`plan_iteration`: `epochs` shuffled passes); returns (state, mean step metrics,
    the last step's lr). Metrics are read once after the epochs: no host sync between steps."""
    step_metrics = []
    for idx in order:
        state, m = step_fn(state, take_rows(full, replicated(idx, st.mesh), st.mesh, st.rules))
        step_metrics.append(m)
    sums: dict[str, float] = {}
    for m in jax.device_get(step_metrics):
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    row = {k: v / len(step_metrics) for k, v in sums.items() if k not in ("weight", "lr")}
    return state, row, float(m["lr"])


def take_rows(tree: dict, idx: jax.Array, mesh: Mesh, rules: str) -> dict:
    """The rows `idx` of every array, split by row over the mesh like a training batch."""
    return _gather(row_sharding(mesh, rules))(tree, idx)


@functools.cache
def _gather(sharding) -> Callable:
    return jax.jit(lambda tree, idx: jax.tree.map(lambda x: x[idx], tree), out_shardings=sharding)
