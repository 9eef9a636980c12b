"""Held-out figures of stages that train with `run_loop`: summed aux figures over validation
batches on one process or many (`make_totals`), the LM figures from them (loss, perplexity,
accuracy) and the unigram baseline a pretraining loss compares to."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator

import jax
import numpy as np

from jaxllm.training.state import TrainState, to_global

EvalBatches = Callable[[int | None], Iterable[dict]]  # num_batches (None: as many as there are)
KEEP_BYTES = 256 << 20  # the most host memory a held-out pass's batches are kept in


class Replayed:
    """A held-out stream read once and replayed: `iter()` gives `make()`'s batches, and after
    the first complete pass, the same batches again from host memory when they fit in
    `limit` bytes (a larger stream is read again each pass). Held-out streams are the same
    on every pass (file order, seeded masks), so a later evaluation re-reads no file and
    renders, tokenizes or masks nothing: it costs the model's forward passes alone."""

    def __init__(self, make: Callable[[], Iterable[dict]], limit: int = KEEP_BYTES) -> None:
        self.make, self.limit = make, limit
        self.kept: list[dict] | None = None

    def __iter__(self) -> Iterator[dict]:
        if self.kept is not None:
            yield from self.kept
            return
        kept: list[dict] | None = []
        size = 0
        for batch in self.make():
            if kept is not None:
                size += sum(np.asarray(v).nbytes for v in batch.values())
                if size > self.limit:
                    kept = None
                else:
                    kept.append(batch)
            yield batch
        self.kept = kept  # only a pass that ran to its end is kept


def make_totals(
    eval_step: Callable, batches: EvalBatches, mesh, max_batches: int = 0
) -> Callable[[TrainState], dict[str, float]]:
    """`totals(state)`: every aux sum of `eval_step` added up over the validation batches.

    `batches(num_batches)` gives this process's validation batches, topped up with
    all-padding batches to `num_batches` when that is given. Each eval batch is a collective
    step, so with many processes all must run the same number: their slices of the data
    give different counts, so the first call counts each process's batches (up to
    `max_batches`) and every call runs the largest count on every process. The batches are
    read once and replayed from host memory (`Replayed`)."""
    count: list[int | None] = []  # the common count, found once
    stream: list[Replayed] = []  # its batches, kept after the first evaluation

    def totals(state: TrainState) -> dict[str, float]:
        if not count:
            count.append(common_batch_count(batches, max_batches))
            limit = count[0] if count[0] is not None else (max_batches or None)
            stream.append(Replayed(lambda: itertools.islice(batches(count[0]), limit)))
        out: dict[str, float] = {}
        for batch in stream[0]:
            for k, v in jax.device_get(eval_step(state, to_global(batch, mesh))).items():
                out[k] = out.get(k, 0.0) + float(v)
        return out

    return totals


def make_evaluator(
    eval_step: Callable, batches: EvalBatches, mesh, max_batches: int = 0
) -> Callable[[TrainState], dict[str, float]]:
    """Loss / perplexity / accuracy over the validation batches, summed exactly then divided
    (the sums of `make_totals`: the same batch count on every process)."""
    sums = make_totals(eval_step, batches, mesh, max_batches)

    def evaluate(state: TrainState) -> dict[str, float]:
        totals = sums(state)
        w = totals.get("weight", 0.0) or 1.0  # the true total; 1 only for an empty split
        loss = totals.get("ce", totals.get("loss", 0.0)) / w
        return {
            "loss": loss,
            "ppl": math.exp(min(loss, 50.0)),
            "accuracy": totals.get("correct", 0.0) / w,
            "tokens": totals.get("weight", 0.0),
        }

    return evaluate


def common_batch_count(batches: EvalBatches, max_batches: int = 0) -> int | None:
    """The number of eval batches every process runs: the most any process has (capped at
    `max_batches`); None in a single process, which just runs its batches."""
    if jax.process_count() == 1:
        return None
    from jaxllm.sharding.multihost import max_over_processes

    mine = sum(1 for _ in itertools.islice(batches(None), max_batches or None))
    return max_over_processes(mine)


def unigram_cross_entropy(
    train_ids: Iterable[list[int]], val_ids: Iterable[list[int]], vocab_size: int
) -> float:
    """Validation loss of an add-one-smoothed unigram model fitted on the train tokens.

    Scored on the same positions the LM is scored on (every token but a document's first), so
    the two losses compare directly.
    """
    counts = np.ones(vocab_size, np.float64)
    for ids in train_ids:
        counts += np.bincount(np.asarray(ids, np.int64), minlength=vocab_size)[:vocab_size]
    logp = np.log(counts / counts.sum())
    total, n = 0.0, 0
    for ids in val_ids:
        ids = np.asarray(ids[1:], np.int64)
        total -= float(logp[ids].sum())
        n += ids.size
    return total / max(n, 1)
