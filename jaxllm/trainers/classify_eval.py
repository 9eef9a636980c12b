"""Held-out figures of `stage: classify`: one ordered pass over a split through a jitted
step on one host or many (`ClassifierPass`), accuracy / macro-F1 / confusion matrix from
its predictions (`classification_figures`), and the per-example rows of
`predictions.jsonl`.

Every process scores its share of the examples in the same number of batches (a collective
step each: `eval_batch_count`), and each batch's outputs are gathered to every process, so
every process ends with every example's probabilities, in file order.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm.config import LoaderConfig
from jaxllm.data.classify import Example, eval_batch_count, make_classify_eval_dataset
from jaxllm.errors import JaxllmError
from jaxllm.sharding import use_rules
from jaxllm.trainers.encoder import encoder_inputs
from jaxllm.training.state import TrainState, batch_sharding, to_global


def make_logits_fn(graphdef, shardings, mesh, rules: str):
    """`logits(state, global batch) -> [B, C]`: the classifier without dropout, jitted once
    for every split (they share the batch shape)."""

    @partial(jax.jit, in_shardings=(shardings, batch_sharding(mesh, 1)))
    def logits(state: TrainState, batch: dict[str, jax.Array]) -> jax.Array:
        with use_rules(mesh, rules):
            model = nnx.merge(graphdef, state.params, state.frozen)
            return model(batch["tokens"], **encoder_inputs(batch, None))

    return logits


class ClassifierPass:
    """`pass_(state) -> probabilities [N, C]` (float64, row i = example i) of a split,
    through `logits_fn` (`make_logits_fn`)."""

    def __init__(
        self, examples: Sequence[Example], tok, loader: LoaderConfig, mesh, logits_fn
    ) -> None:
        self.examples, self.tok, self.loader, self.mesh = examples, tok, loader, mesh
        self.num_batches = eval_batch_count(len(examples), loader, jax.process_count())
        replicated = NamedSharding(mesh, PartitionSpec())
        self._gather = jax.jit(lambda tree: tree, out_shardings=replicated)
        self._logits = logits_fn

    def __call__(self, state: TrainState) -> np.ndarray:
        batches = make_classify_eval_dataset(
            self.examples, self.tok, self.loader, process_index=jax.process_index(),
            process_count=jax.process_count(), num_batches=self.num_batches,
        )  # fmt: skip
        probs, index = [], []
        for batch in batches:
            g = to_global(batch, self.mesh)
            out = jax.device_get(
                self._gather({"logits": self._logits(state, g), "index": g["index"]})
            )
            probs.append(_softmax(np.asarray(out["logits"], np.float64)))
            index.append(np.asarray(out["index"]))
        return _in_order(np.concatenate(probs), np.concatenate(index), len(self.examples))


def _softmax(logits_NC: np.ndarray) -> np.ndarray:
    z = np.exp(logits_NC - logits_NC.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _in_order(probs_RC: np.ndarray, index_R: np.ndarray, n: int) -> np.ndarray:
    """The rows of real examples (index >= 0) placed by index; each must appear once."""
    real = index_R >= 0
    out = np.zeros((n, probs_RC.shape[1]))
    out[index_R[real]] = probs_RC[real]
    if real.sum() != n or len(np.unique(index_R[real])) != n:
        raise JaxllmError(f"classify eval: scored {real.sum()} rows for {n} examples")
    return out


def classification_figures(
    labels_N: np.ndarray, preds_N: np.ndarray, n_classes: int
) -> dict[str, Any]:
    """Accuracy, macro-F1 (the mean F1 over the labels that occur in the targets or the
    predictions, as scikit-learn's `f1_score(average="macro")`) and the confusion matrix
    (rows: true label, columns: predicted)."""
    confusion = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(confusion, (labels_N, preds_N), 1)
    tp = np.diag(confusion).astype(np.float64)
    true, pred = confusion.sum(axis=1), confusion.sum(axis=0)
    present = (true + pred) > 0
    f1 = np.where(present, 2 * tp / np.maximum(true + pred, 1), 0.0)
    return {
        "accuracy": float(tp.sum() / max(len(labels_N), 1)),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "confusion": confusion.tolist(),
    }


def split_figures(probs_NC: np.ndarray, examples: Sequence[Example]) -> dict[str, Any]:
    """`classification_figures` of a split's probabilities, with its mean cross-entropy."""
    labels = np.array([e.label for e in examples])
    figures = classification_figures(labels, probs_NC.argmax(axis=1), probs_NC.shape[1])
    picked = probs_NC[np.arange(len(labels)), labels]
    figures["loss"] = float(-np.mean(np.log(np.maximum(picked, 1e-12))))
    return figures


def prediction_rows(
    split: str, probs_NC: np.ndarray, examples: Sequence[Example], labels: Sequence[str]
) -> list[dict[str, Any]]:
    """One `predictions.jsonl` row per example: where it came from, its texts, its label,
    the prediction and every label's probability."""
    rows = []
    for ex, p in zip(examples, probs_NC):
        row: dict[str, Any] = {"split": split, "line": ex.line, "text": ex.text}
        if ex.pair is not None:
            row["text_pair"] = ex.pair
        row.update(label=labels[ex.label], prediction=labels[int(p.argmax())],
                   probabilities={name: round(float(q), 4) for name, q in zip(labels, p)})  # fmt: skip
        rows.append(row)
    return rows
