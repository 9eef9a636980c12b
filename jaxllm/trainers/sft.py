"""`stage: sft` — supervised fine-tuning of a pretrained decoder on chat records.

The same machine as pretraining, fed different parts: the weights come from `inputs.checkpoint`
(model config from its metadata, fresh optimizer), the batches from `data/sft.py` (same keys,
the loss mask on the answer tokens only), and `lm_loss` + `make_train_step` + `run_loop` run
unchanged, with checkpoints and resume. Before and after training it scores the held-out set:
the loss on answer tokens and the exact-match rate of greedy answers to the chat prompts (after:
with `train.keep_best`, of the best/ checkpoint the stage hands on). Every training record is
rendered once at start-up (`train_fit`), so a malformed one stops the run before step 1.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxllm.config import Config, replace
from jaxllm.config.sft import SFTConfig
from jaxllm.data.sft import SFTRecords, length_census, make_sft_dataset, make_sft_eval_dataset
from jaxllm.errors import ConfigError
from jaxllm.generation import Sampler, response_texts, sample_all
from jaxllm.rundir import RunDir
from jaxllm.sharding import make_mesh
from jaxllm.tokenizer.chat import ChatTemplate, split_answer
from jaxllm.trainers import data_file
from jaxllm.trainers.held_out import make_evaluator
from jaxllm.trainers.lm import (
    best_figures,
    best_state,
    checkpoint_dir,
    init_from_checkpoint,
    kernel_choices,
    lm_loss,
    loop_spec,
    output_checkpoint,
    param_figures,
    resolve_loss_chunk,
    restore_or_init,
    stage_tokenizer,
)
from jaxllm.trainers.rewards import final_answer
from jaxllm.training.checkpoint import Checkpointer
from jaxllm.training.loop import run_loop
from jaxllm.training.metrics import plot_losses
from jaxllm.training.optim import lr_schedule, make_optimizer
from jaxllm.training.state import TrainState
from jaxllm.training.step import make_eval_step, make_train_step


def run(cfg: Config, run_dir: RunDir) -> dict[str, Any]:
    """Fine-tunes `inputs.checkpoint` on `sft.train_file` with the prompt-masked loss."""
    i = cfg.inputs  # a pipeline can hand on SFT data (e.g. a distill teacher's answers)
    s = replace(cfg.sft, train_file=i.sft_data or cfg.sft.train_file,
                val_file=i.sft_val_data or cfg.sft.val_file)  # fmt: skip
    t, mesh = cfg.train, make_mesh(cfg.mesh)
    tx = make_optimizer(t.optim, t.steps)
    start_point = init_from_checkpoint(cfg, tx, mesh)
    graphdef, state, shardings = start_point.graphdef, start_point.state, start_point.shardings
    m, meta = start_point.model, start_point.meta
    tok, tok_path = stage_tokenizer(cfg, meta, m)
    template = ChatTemplate(tok)
    pi, pc = jax.process_index(), jax.process_count()
    opts = dict(fmt=s.format, packing=s.packing, process_index=pi, process_count=pc,
                tasks=s.tasks)  # fmt: skip
    fit = _fit_report(cfg, s, template)
    batches = _train_batches(cfg, s, template, opts)
    loss_fn = lm_loss(t.z_loss, resolve_loss_chunk(cfg))
    score = _scorer(cfg, s, m, graphdef, shardings, mesh, loss_fn, template, opts)
    before = score(state)  # always the pretrained weights, also when this run resumes
    ckpt = Checkpointer(checkpoint_dir(run_dir.path), t.keep_checkpoints, t.async_checkpoint)
    state, start = restore_or_init(ckpt, state, shardings, batches)
    step_fn = make_train_step(
        graphdef, loss_fn, tx, lr_schedule(t.optim, t.steps), shardings, mesh,
        cfg.mesh.rules, t.grad_accum,
    )  # fmt: skip
    meta = start_point.checkpoint_meta(cfg, tok_path)
    spec = loop_spec(
        cfg, step_fn, batches, mesh, score.val_loss, meta, final_save=start_point.final_save
    )
    state, last = run_loop(spec, state, ckpt, run_dir.path)
    ckpt.close()
    kept, folded = best_state(cfg, run_dir.path, start_point, state, mesh)
    if folded is not None:  # a reparameterised PEFT run's best/: the folded model scores it
        score = _scorer(cfg, s, m, folded[0], folded[1], mesh, loss_fn, template, opts)
    after = score(kept)
    plot = plot_losses(run_dir.path / "metrics.jsonl", run_dir.path / "loss.png", cfg.name)
    summary = _summary(cfg, start, last, before, after, plot, run_dir, tok_path)
    summary.update(kernel_choices(cfg, m))
    summary["train_fit"] = fit
    return {**param_figures(start_point, run_dir.path), **summary}


def _fit_report(cfg: Config, s: SFTConfig, template: ChatTemplate) -> dict[str, int]:
    """`length_census` of the training file (packed or not, a conversation longer than
    seq_len is cut): says how many are cut, and refuses a file whose every conversation is cut
    before its answer (nothing to learn). Checks every record (file:line) before training."""
    file = data_file(s.train_file, "sft.train_file")
    records = SFTRecords([file], s.format, s.tasks, key="sft.train_file")
    L = cfg.loader.seq_len
    fit = length_census(records, template, L, s.train_on_prompt, s.trace)
    if fit["longer"] and jax.process_index() == 0:
        print(f"sft: {fit['longer']} of {fit['conversations']} conversations in {file} are "
              f"longer than loader.seq_len {L} and cut, {fit['without_answer']} of them "
              "before any answer token (those rows train nothing)")  # fmt: skip
    if fit["without_answer"] == fit["conversations"]:
        raise ConfigError(
            f"config key 'loader.seq_len': {L} cuts every conversation in {file} before its "
            "answer, so no row has a token to learn; raise it"
        )
    return fit


def _train_batches(cfg: Config, s: SFTConfig, template: ChatTemplate, opts: dict):
    """The endless, shuffled training stream (micro-batches stacked under grad_accum)."""
    files = [data_file(s.train_file, "sft.train_file")]
    ds = make_sft_dataset(
        files, template, cfg.loader, seed=cfg.seed, train_on_prompt=s.train_on_prompt,
        trace=s.trace, **opts,
    )  # fmt: skip
    if cfg.train.grad_accum > 1:
        ds = ds.batch(cfg.train.grad_accum, drop_remainder=True)
    return iter(ds)


class _Scorer:
    """Held-out figures of a state: `val_loss(state)` (answer tokens) and, called, both plus
    exact match of greedy answers and a few samples."""

    def __init__(self, val_loss, answers) -> None:
        self.val_loss, self.answers = val_loss, answers

    def __call__(self, state: TrainState) -> dict[str, Any]:
        out = {"val_loss": self.val_loss(state)["loss"]} if self.val_loss else {}
        return {**out, **(self.answers(state) if self.answers else {})}


def _scorer(cfg, s: SFTConfig, m, graphdef, shardings, mesh, loss_fn, template, opts) -> _Scorer:
    if not s.val_file:
        return _Scorer(None, None)
    val_files = [data_file(s.val_file, "sft.val_file")]
    records = SFTRecords(val_files, s.format, s.tasks, key="sft.val_file")  # not empty
    eval_step = make_eval_step(graphdef, loss_fn, shardings, mesh, cfg.mesh.rules)

    def val_batches(num_batches: int | None):  # answer tokens only, whatever train_on_prompt
        return make_sft_eval_dataset(
            val_files, template, cfg.loader, trace=s.trace, num_batches=num_batches, **opts
        )

    evaluate = make_evaluator(eval_step, val_batches, mesh, cfg.train.eval_batches)
    answers = None
    if s.eval_examples:
        limit = m.max_seq_len if m.positions == "learned" else None
        answers = make_answer_scorer(
            graphdef, template, records, s, cfg.seed, limit, mesh=mesh, rules=cfg.mesh.rules
        )
    return _Scorer(evaluate, answers)


def make_answer_scorer(
    graphdef, template: ChatTemplate, records: SFTRecords, s: SFTConfig, seed: int,
    max_len: int | None = None, *, mesh: Mesh | None = None, rules: str = "dp",
):  # fmt: skip
    """`score(state) -> {"exact_match", "exact_match_by_task", "samples"}` on up to
    `s.eval_examples` held-out records, evenly spaced through the file (prompts whose answer
    would run past `max_len` positions are left out). Greedy answers run `eval_batch_size`
    prompts at a time, split over `mesh`; every process gets the same figures."""
    n = len(records)
    picks = np.unique(np.linspace(0, n - 1, min(s.eval_examples, n)).astype(int)).tolist()
    prompts, refs, tasks = [], [], []
    for i in picks:
        history, answer = split_answer(records[i])
        ids = template.prompt_ids(history)
        if max_len and len(ids) + s.eval_max_new_tokens - 1 > max_len:
            continue
        prompts.append(ids)
        refs.append(answer)
        tasks.append(str(records.record(i).get("task", "all")))
    if not prompts:
        raise ConfigError(f"sft.val_file: no held-out prompt fits in {max_len} positions")
    stops = [template.ids["<|end|>"], template.ids["</s>"]]
    sampler = Sampler(graphdef, mesh=mesh, rules=rules)

    def score(state: TrainState) -> dict[str, Any]:
        weights = nnx.merge_state(state.params, state.frozen)
        res = sample_all(
            sampler, weights, prompts, batch_size=s.eval_batch_size,
            key_for=lambda n: jax.random.key(seed), max_new_tokens=s.eval_max_new_tokens,
            stop_ids=stops,
        )  # fmt: skip
        preds = response_texts(template.tok, res)
        hits = [final_answer(p) == final_answer(r) for p, r in zip(preds, refs)]
        by_task = {
            t: round(float(np.mean([h for h, k in zip(hits, tasks) if k == t])), 4)
            for t in sorted(set(tasks))
        }
        samples = [
            {"prompt": template.tok.decode(p), "reference": r, "answer": a}
            for p, r, a in list(zip(prompts, refs, preds))[:6]
        ]
        acc = round(float(np.mean(hits)), 4)
        return {"exact_match": acc, "exact_match_by_task": by_task, "samples": samples}

    return score


def _summary(cfg, start, last, before, after, plot, run_dir, tok_path) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "steps": cfg.train.steps,
        "resumed_from_step": start,
        "final_train_loss": last.get("loss"),
        "tokens_per_s": last.get("tokens_per_s"),
    }
    for key in ("val_loss", "exact_match", "exact_match_by_task"):
        if key in before:
            summary[f"{key}_before"] = _round(before[key])
            summary[f"{key}_after"] = _round(after[key])
    if "samples" in after:
        summary["samples_before"], summary["samples_after"] = before["samples"], after["samples"]
    summary["loss_plot"] = plot.name if plot else None
    summary.update(best_figures(last))
    summary["outputs"] = {
        "checkpoint": output_checkpoint(cfg, run_dir.path),
        "tokenizer": str(tok_path),
    }
    return summary


def _round(x: Any) -> Any:
    return round(x, 4) if isinstance(x, float) else x
