"""`stage: classify` — fine-tune an encoder for text classification (sentiment by default).

The same loop as every stage: the model is the encoder of `inputs.checkpoint` (a `stage: mlm`
run; its MLM/NSP heads are never read) with a `ClassifierModel` head on the pooled `[CLS]`,
or with `classify.init: random` the same encoder shape from a fresh init (the comparison that
says what pretraining is worth). The batches are labelled texts or sentence pairs
(`data/classify.py`), the loss the cross-entropy of the label, and `peft.method` (lora,
adapter, prefix, prompt) works as in the decoder stages: the head is a `HeadParam`, so it
trains next to the method's variables; a reparameterised prefix/prompt run's last (and best)
checkpoint holds the folded values (the loop's `final_save`, as in sft).

Every file is read and checked before anything trains. Held-out figures come from one
batched, jitted pass per split on one host or many (`classify_eval.py`): accuracy, macro-F1
and the confusion matrix on `val_file` before and after training and on `test_file` after;
process 0 writes every held-out example's prediction to `predictions.jsonl`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxllm.config import ClassifyConfig, Config, replace
from jaxllm.data.classify import (
    Example,
    labels_of,
    make_classify_dataset,
    make_examples,
    read_labelled,
)
from jaxllm.errors import DataError
from jaxllm.models.heads import ClassifierModel
from jaxllm.rundir import RunDir, atomic_write_text
from jaxllm.sharding import make_mesh
from jaxllm.trainers import data_file, require_input
from jaxllm.trainers.classify_eval import (
    ClassifierPass,
    make_logits_fn,
    prediction_rows,
    split_figures,
)
from jaxllm.trainers.encoder import (
    checkpoint_encoder,
    encoder_inputs,
    init_encoder,
    load_wordpiece,
    stage_wordpiece,
)
from jaxllm.trainers.lm import (
    StartPoint,
    best_figures,
    best_state,
    checkpoint_dir,
    loop_spec,
    output_checkpoint,
    param_figures,
    resolve_model,
    restore_or_init,
    start_from_model,
)
from jaxllm.training.checkpoint import Checkpointer
from jaxllm.training.loop import run_loop
from jaxllm.training.losses import cross_entropy
from jaxllm.training.metrics import plot_losses
from jaxllm.training.optim import lr_schedule, make_optimizer
from jaxllm.training.step import make_train_step

Splits = dict[str, list[Example]]


def classify_loss(model: ClassifierModel, batch: dict[str, jax.Array], key):
    """`loss_fn(model, batch, key)`: the label's cross-entropy summed over real rows."""
    logits_BC = model(batch["tokens"], **encoder_inputs(batch, key))
    return cross_entropy(logits_BC, batch["labels"], batch["weights"])


def read_splits(c: ClassifyConfig) -> tuple[Splits, tuple[str, ...], bool]:
    """`(examples by split, label set, is a pair task)`: every file read and checked."""
    train = data_file(c.train_file, "classify.train_file")
    rows, pairs = read_labelled(train, "classify.train_file")
    labels = c.labels or labels_of(rows, train)
    if len(labels) == 1:  # as ClassifyConfig checks `labels:`, for labels read from the file
        raise DataError(
            f"config key 'classify.train_file': every record of {train} has the label "
            f"{labels[0]!r}; a classifier needs at least two labels (add records of another)"
        )
    splits = {"train": make_examples(rows, train, labels, pairs, train)}
    for split, value in (("val", c.val_file), ("test", c.test_file)):
        if value:
            key = f"classify.{split}_file"
            path = data_file(value, key)
            splits[split] = make_examples(read_labelled(path, key)[0], path, labels, pairs, train)
    return splits, tuple(labels), pairs


def _encoder(cfg: Config, mesh):
    """`(encoder, model config, input checkpoint meta, base checkpoint)`: the encoder of
    `inputs.checkpoint`, or a fresh one of its shape (`init: random`; `model:` without one),
    running `classify.dropout`."""
    c, rules = cfg.classify, cfg.mesh.rules
    if c.init == "checkpoint" or cfg.inputs.checkpoint:
        weights = c.init == "checkpoint"
        encoder, m, meta, source = checkpoint_encoder(cfg, mesh, weights, dropout=c.dropout)
        if encoder is not None:
            return encoder, m, meta, source
        return init_encoder(m, cfg.seed, mesh, rules), m, meta, ""
    tok = load_wordpiece(require_input(cfg, "tokenizer"))
    m = replace(resolve_model(cfg, tok.vocab_size, arch="encoder"), dropout=c.dropout)
    return init_encoder(m, cfg.seed, mesh, rules), m, {}, ""


def _start(cfg: Config, labels: tuple[str, ...], tx, mesh) -> tuple[StartPoint, Any, str]:
    """`(start point, tokenizer, kept tokenizer path)` of the classifier."""
    if cfg.inputs.tokenizer:  # a tokenizer of the wrong kind fails before any loading
        load_wordpiece(cfg.inputs.tokenizer)
    encoder, m, meta, source = _encoder(cfg, mesh)
    tok, tok_path = stage_wordpiece(cfg, meta, m)
    rngs = nnx.Rngs(params=cfg.seed)
    model = ClassifierModel(encoder, len(labels), rngs=rngs, pooling=cfg.classify.pooling)
    return start_from_model(cfg, model, m, meta, source, tx, mesh, rngs), tok, tok_path


def run(cfg: Config, run_dir: RunDir) -> dict[str, Any]:
    """Fine-tunes a classifier on `classify.train_file`; scores val and test."""
    splits, labels, pairs = read_splits(cfg.classify)
    t, mesh = cfg.train, make_mesh(cfg.mesh)
    tx = make_optimizer(t.optim, t.steps)
    start_point, tok, tok_path = _start(cfg, labels, tx, mesh)
    graphdef, state, shardings = start_point.graphdef, start_point.state, start_point.shardings
    ds = make_classify_dataset(
        splits["train"], tok, cfg.loader, seed=cfg.seed, process_index=jax.process_index(),
        process_count=jax.process_count(),
    )  # fmt: skip
    if t.grad_accum > 1:
        ds = ds.batch(t.grad_accum, drop_remainder=True)
    batches = iter(ds)
    logits_fn = make_logits_fn(graphdef, shardings, mesh, cfg.mesh.rules)
    passes = {s: ClassifierPass(splits[s], tok, cfg.loader, mesh, logits_fn)
              for s in ("val", "test") if s in splits}  # fmt: skip

    probs: dict[str, tuple[int, Any]] = {}  # split -> (step, probabilities) of the last pass

    def predict(state, split: str):
        step = int(state.step)
        if probs.get(split, (-1,))[0] != step:
            probs[split] = (step, passes[split](state))
        return probs[split][1]

    def evaluate(state, split: str = "val") -> dict[str, Any]:
        return split_figures(predict(state, split), splits[split])

    before = evaluate(state) if "val" in passes else {}  # also on a resume: the start
    ckpt = Checkpointer(checkpoint_dir(run_dir.path), t.keep_checkpoints, t.async_checkpoint)
    state, start = restore_or_init(ckpt, state, shardings, batches)
    step_fn = make_train_step(
        graphdef, classify_loss, tx, lr_schedule(t.optim, t.steps), shardings, mesh,
        cfg.mesh.rules, t.grad_accum,
    )  # fmt: skip
    meta = start_point.checkpoint_meta(cfg, tok_path)
    meta["head"] = {"kind": "classify", "labels": list(labels), "pairs": pairs}
    eval_fn = _scalars(evaluate) if "val" in passes else None
    spec = loop_spec(cfg, step_fn, batches, mesh, eval_fn, meta, final_save=start_point.final_save)
    state, last = run_loop(spec, state, ckpt, run_dir.path)
    ckpt.close()
    state, folded = best_state(cfg, run_dir.path, start_point, state, mesh)
    if folded is not None:  # best/ holds folded prefixes/prompts: score that model
        folded_logits = make_logits_fn(*folded, mesh, cfg.mesh.rules)
        passes = {s: ClassifierPass(splits[s], tok, cfg.loader, mesh, folded_logits)
                  for s in passes}  # fmt: skip
        probs.clear()
    final = {s: predict(state, s) for s in passes}  # val: the loop's last pass, reused
    after = {s: split_figures(final[s], splits[s]) for s in final}
    _write_predictions(run_dir.path / "predictions.jsonl", final, splits, labels)
    plot = plot_losses(run_dir.path / "metrics.jsonl", run_dir.path / "loss.png", cfg.name)
    summary = _summary(cfg, labels, pairs, start, last, before, after, splits)
    summary["loss_plot"] = plot.name if plot else None
    summary.update(best_figures(last))
    summary["outputs"] = {"checkpoint": output_checkpoint(cfg, run_dir.path),
                          "tokenizer": str(tok_path)}  # fmt: skip
    return {**param_figures(start_point, run_dir.path), **summary}


def _scalars(evaluate):
    """The loop's eval: the float figures of the validation split."""
    return lambda state: {k: v for k, v in evaluate(state).items() if isinstance(v, float)}


def _write_predictions(path: Path, probs: dict, splits: Splits, labels) -> None:
    """`predictions.jsonl`, one row per held-out example; process 0 writes it whole."""
    if jax.process_index() != 0 or not probs:
        return
    rows = [r for s in probs for r in prediction_rows(s, probs[s], splits[s], labels)]
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _summary(cfg, labels, pairs, start, last, before, after, splits) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "labels": list(labels),
        "pairs": pairs,
        "init": cfg.classify.init,
        "examples": {s: len(v) for s, v in splits.items()},
        "steps": cfg.train.steps,
        "resumed_from_step": start,
        "final_train_loss": last.get("loss"),
        "final_train_accuracy": last.get("correct"),
        "tokens_per_s": last.get("tokens_per_s"),
    }
    for key in ("accuracy", "macro_f1", "loss"):
        if before:
            summary[f"val_{key}_before"] = round(before[key], 4)
        for split, figures in after.items():
            summary[f"{split}_{key}"] = round(figures[key], 4)
    for split, figures in after.items():
        summary[f"{split}_confusion"] = figures["confusion"]  # rows: true, columns: predicted
        counts = np.bincount([e.label for e in splits[split]], minlength=len(labels))
        summary[f"{split}_majority_accuracy"] = round(float(counts.max() / counts.sum()), 4)
    return summary
