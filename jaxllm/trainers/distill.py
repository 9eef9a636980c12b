"""`stage: distill` — a teacher checkpoint (`inputs.checkpoint`) teaches a student.

White-box (`distill.mode: white_box`): the student (a fresh, usually smaller model from
`model:`, or `distill.student_checkpoint`) trains on the pretraining batches with
`(1 - alpha) * CE + alpha * KL` between the temperature-softened teacher and student
distributions. The teacher is a step constant (`consts`): its forward runs inside the same
jitted step, under stop_gradient, never updated or checkpointed. `distill.baseline` trains the
same student from the same init on the same batches with alpha = 0, so the summary shows what
the teacher added; it also reports the teacher's own validation loss.

Black-box (`distill.mode: black_box`): the teacher answers a prompt set with the batched
sampler; the answers are written as `{"prompt", "response"}` SFT records and handed on as
outputs `sft_data` / `sft_val_data`, which a following `stage: sft` trains the student on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxllm.config import Config, replace, to_dict
from jaxllm.config.distill import DistillConfig
from jaxllm.data.pipeline import make_eval_dataset, make_lm_dataset
from jaxllm.data.preference import PromptRecords, record_error
from jaxllm.data.sources import cleaned_shards
from jaxllm.errors import ConfigError
from jaxllm.generation import Sampler, sample_all
from jaxllm.generation.sampler import SampleResult
from jaxllm.rundir import RunDir, atomic_write_text
from jaxllm.sharding import make_mesh
from jaxllm.tokenizer import Tokenizer
from jaxllm.tokenizer.chat import END_TOKEN, STRUCTURAL, ChatTemplate
from jaxllm.trainers import data_file, require_input
from jaxllm.trainers.held_out import make_evaluator
from jaxllm.trainers.lm import (
    best_figures,
    checkpoint_dir,
    init_from_checkpoint,
    lm_loss,
    load_frozen_model,
    load_model_tokenizer,
    loop_spec,
    make_watch,
    model_fn,
    output_checkpoint,
    resolve_loss_chunk,
    resolve_model,
    restore_or_init,
    stage_tokenizer,
)
from jaxllm.training.checkpoint import Checkpointer
from jaxllm.training.loop import run_loop
from jaxllm.training.losses import cross_entropy, distill_loss
from jaxllm.training.metrics import plot_losses
from jaxllm.training.optim import lr_schedule, make_optimizer
from jaxllm.training.preemption import check_deferred, clear_deferred
from jaxllm.training.state import count_params, create_train_state
from jaxllm.training.step import make_eval_step, make_train_step


def run(cfg: Config, run_dir: RunDir) -> dict[str, Any]:
    if cfg.distill.mode == "black_box":
        return teacher_answers(cfg, run_dir)
    return white_box(cfg, run_dir)


# ----------------------------------------------------------------------------- white-box


def distill_lm_loss(
    teacher_graphdef: nnx.GraphDef, d: DistillConfig, z_loss: float = 0.0
):  # fmt: skip
    """`loss_fn(student, batch, key, consts)`: `(1 - alpha) * CE + alpha * T^2 * KL
    + z_loss * logsumexp^2` summed over the loss-masked tokens (the z-loss in full, as the
    baseline and pretraining add it); `consts["teacher"]` is the teacher's state. aux: `ce`
    (the student's data loss), `z_loss` (the lse^2 sum), `kl` (unscaled), `distill` (the
    scaled KL term) and `weight`."""

    def loss_fn(model, batch, key, consts):
        kw = dict(positions_BL=batch["positions"], segment_ids_BL=batch["segment_ids"])
        logits_BLV = model(batch["tokens"], deterministic=key is None, key=key, **kw)
        teacher = nnx.merge(teacher_graphdef, consts["teacher"])
        teacher_BLV = jax.lax.stop_gradient(teacher(batch["tokens"], deterministic=True, **kw))
        mask_BL = batch["loss_mask"]
        ce, aux = cross_entropy(logits_BLV, batch["targets"], mask_BL)
        kd, kd_aux = distill_loss(logits_BLV, teacher_BLV, mask_BL, d.temperature, d.kind)
        loss = (1.0 - d.alpha) * ce + d.alpha * kd
        if z_loss:
            loss = loss + z_loss * aux["z_loss"]
        return loss, {**aux, "kl": kd_aux["kl"], "distill": kd}

    return loss_fn


class _Student:
    """Builds the student's starting state (twice when a baseline runs: same init)."""

    def __init__(self, cfg: Config, teacher_m, tx, mesh) -> None:
        self.cfg, self.tx, self.mesh, d = cfg, tx, mesh, cfg.distill
        if d.student_checkpoint:
            self.cfg_in = replace(cfg, **{"inputs.checkpoint": d.student_checkpoint})
            self.model = init_from_checkpoint(self.cfg_in, tx, mesh).model
            key = "distill.student_checkpoint"
        else:
            self.model = resolve_model(cfg, teacher_m.vocab_size)
            key = "model.vocab_size"
        if self.model.vocab_size != teacher_m.vocab_size:
            raise ConfigError(
                f"config key '{key}': the student's vocab_size {self.model.vocab_size} differs "
                f"from the teacher's ({teacher_m.vocab_size}); teacher and student must share "
                "a tokenizer (set model.vocab_size: 0 to take the teacher's)"
            )
        if teacher_m.positions == "learned" and cfg.loader.seq_len > teacher_m.max_seq_len:
            raise ConfigError(
                f"config key 'loader.seq_len': {cfg.loader.seq_len} exceeds the teacher's "
                f"max_seq_len ({teacher_m.max_seq_len})"
            )

    def init(self):
        """`(graphdef, state, shardings, meta_fn(tok_path))` of a fresh start."""
        cfg = self.cfg
        if cfg.distill.student_checkpoint:
            sp = init_from_checkpoint(self.cfg_in, self.tx, self.mesh)
            return sp.graphdef, sp.state, sp.shardings, lambda tok: sp.checkpoint_meta(cfg, tok)
        g, state, shardings = create_train_state(
            model_fn(self.model, cfg.seed), self.tx, self.mesh, cfg.mesh.rules, cfg.seed
        )
        meta = {"config": to_dict(cfg), "model": to_dict(self.model)}
        return g, state, shardings, lambda tok: {**meta, "tokenizer": str(tok)}


def white_box(cfg: Config, run_dir: RunDir) -> dict[str, Any]:
    """Trains the student on the teacher's logits (and, with `baseline`, without them)."""
    clear_deferred()  # a notice from an earlier run of this process is not this run's
    d, t, mesh = cfg.distill, cfg.train, make_mesh(cfg.mesh)
    tg, tstate, tshard, tm, tmeta = load_frozen_model(
        require_input(cfg, "checkpoint"), mesh, cfg.mesh.rules
    )
    tok, tok_path = stage_tokenizer(cfg, tmeta, tm)  # checks the vocabulary against the teacher
    if not isinstance(tok, Tokenizer):  # not the kept copy: process 0 may still be writing it
        tok = Tokenizer.load(tok_path)
    data_dir = require_input(cfg, "data_dir")
    tx = make_optimizer(t.optim, t.steps)
    student = _Student(cfg, tm, tx, mesh)
    consts, const_sh = {"teacher": tstate}, {"teacher": tshard}
    pi, pc = jax.process_index(), jax.process_count()

    def batches():  # the same stream for the distilled student and the baseline
        ds = make_lm_dataset(
            cleaned_shards(data_dir, "train"), tok, cfg.loader, seed=cfg.seed,
            process_index=pi, process_count=pc,
        )  # fmt: skip
        return iter(ds.batch(t.grad_accum, drop_remainder=True) if t.grad_accum > 1 else ds)

    val_shards = cleaned_shards(data_dir, "val")
    if not val_shards:
        raise ConfigError(f"config key 'inputs.data_dir': {data_dir} has no val/ shards")

    def val_batches(num_batches: int | None):
        return make_eval_dataset(
            val_shards, tok, cfg.loader, process_index=pi, process_count=pc,
            num_batches=num_batches,
        )  # fmt: skip

    graphdef, state, shardings, meta_fn = student.init()
    ce_eval = make_eval_step(graphdef, lm_loss(), shardings, mesh, cfg.mesh.rules)
    evaluate = make_evaluator(ce_eval, val_batches, mesh, t.eval_batches)
    teacher_eval = make_eval_step(
        graphdef, _teacher_ce(tg), shardings, mesh, cfg.mesh.rules, const_shardings=const_sh
    )
    teacher_val = make_evaluator(
        lambda s, b: teacher_eval(s, b, consts), val_batches, mesh, t.eval_batches
    )(state)["loss"]

    train_step = make_train_step(
        graphdef, distill_lm_loss(tg, d, t.z_loss), tx, lr_schedule(t.optim, t.steps),
        shardings, mesh, cfg.mesh.rules, t.grad_accum, const_shardings=const_sh,
    )  # fmt: skip
    ckpt = Checkpointer(checkpoint_dir(run_dir.path), t.keep_checkpoints, t.async_checkpoint)
    stream = batches()
    state, start = restore_or_init(ckpt, state, shardings, stream)

    def step_fn(s, b):  # the teacher rides along as a constant, never in the state
        return train_step(s, b, consts)

    spec = loop_spec(cfg, step_fn, stream, mesh, evaluate, meta_fn(tok_path))
    state, last = run_loop(spec, state, ckpt, run_dir.path)
    ckpt.close()
    summary = {
        "steps": t.steps,
        "resumed_from_step": start,
        "alpha": d.alpha,
        "temperature": d.temperature,
        "kind": d.kind,
        "student_params": count_params(state.params),
        "teacher_params": count_params(tstate),
        "final_train_loss": last.get("loss"),
        "final_train_kl": last.get("kl"),
        "tokens_per_s": last.get("tokens_per_s"),
        "val_loss_teacher": round(teacher_val, 4),
        "val_loss_distilled": round(last.get("eval_loss") or evaluate(state)["loss"], 4),
    }
    del state
    if d.baseline:
        check_deferred("the baseline student")  # a notice at the student's last step
        summary.update(_baseline(cfg, student, tx, mesh, batches(), evaluate, run_dir.path))
        gain = summary["val_loss_baseline"] - summary["val_loss_distilled"]
        summary.update(distill_gain=round(gain, 4), distilled_beats_baseline=gain > 0)
    plot = plot_losses(run_dir.path / "metrics.jsonl", run_dir.path / "loss.png", cfg.name)
    summary["loss_plot"] = plot.name if plot else None
    summary.update(best_figures(last))
    summary["outputs"] = {"checkpoint": output_checkpoint(cfg, run_dir.path), "tokenizer": tok_path}
    return summary


def _teacher_ce(teacher_graphdef: nnx.GraphDef):
    """An eval loss that scores the teacher (from `consts`) instead of the model."""
    ce = lm_loss()

    def loss_fn(model, batch, key, consts):
        return ce(nnx.merge(teacher_graphdef, consts["teacher"]), batch, None)

    return loss_fn


def _baseline(cfg, student: _Student, tx, mesh, stream, evaluate, run_dir: Path) -> dict:
    """The same student, init and batches on the data alone (alpha = 0, no teacher forward);
    its metrics go to `baseline/metrics.jsonl` and its checkpoints to `baseline/checkpoints`
    (so a killed or preempted run resumes the baseline too): early stopping applies as to the
    student, but `keep_best` does not (`best/` is the distilled student's)."""
    t = cfg.train
    graphdef, state, shardings, _ = student.init()
    step = make_train_step(
        graphdef, lm_loss(t.z_loss, resolve_loss_chunk(cfg)), tx, lr_schedule(t.optim, t.steps), shardings, mesh,
        cfg.mesh.rules, t.grad_accum,
    )  # fmt: skip
    watch = make_watch(replace(cfg, **{"train.keep_best": False}))
    spec = loop_spec(cfg, step, stream, mesh, evaluate, desc=f"baseline {cfg.name}", watch=watch)
    out = run_dir / "baseline"
    if jax.process_index() == 0:  # its metrics: process 0's, like every run file
        out.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(out / "checkpoints", t.keep_checkpoints, t.async_checkpoint)
    state, _ = restore_or_init(ckpt, state, shardings, stream)
    _, last = run_loop(spec, state, ckpt, out)
    ckpt.close()
    return {
        "final_train_loss_baseline": last.get("loss"),
        "val_loss_baseline": round(last["eval_loss"], 4),
    }


# ----------------------------------------------------------------------------- black-box


def teacher_answers(cfg: Config, run_dir: RunDir) -> dict[str, Any]:
    """Writes the teacher's answers to `prompts_file` (and `val_prompts_file`) as SFT records."""
    d = cfg.distill
    mesh, rules = make_mesh(cfg.mesh), cfg.mesh.rules  # the teacher may span every device
    ckpt = require_input(cfg, "checkpoint")
    graphdef, state, _, m, meta = load_frozen_model(ckpt, mesh, rules)
    tok_path = cfg.inputs.tokenizer or meta.get("tokenizer", "")
    template = ChatTemplate(load_model_tokenizer(tok_path, m))
    limit = m.max_seq_len if m.positions == "learned" else None
    sampler = Sampler(graphdef, mesh=mesh, rules=rules)
    answer = _Answerer(sampler, state, template, d, cfg.seed, limit)
    summary: dict[str, Any] = {"outputs": {}}
    splits = [("train", d.prompts_file, "prompts_file", d.max_prompts)]
    if d.val_prompts_file:
        splits.append(("val", d.val_prompts_file, "val_prompts_file", 0))
    for split, file, key, cap in splits:
        rows, figures = answer(data_file(file, f"distill.{key}"), key, cap)
        if not rows:
            raise ConfigError(
                f"config key 'distill.{key}': no usable teacher answer: "
                f"{figures['skipped_too_long']} prompts too long for {limit} positions, "
                f"{figures['empty_answers']} empty, {figures['dropped_truncated']} cut off at "
                "distill.max_new_tokens (raise it, or set distill.keep_truncated: true)"
            )
        path = run_dir.path / f"teacher_answers_{split}.jsonl"
        if jax.process_index() == 0:
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            atomic_write_text(path, text)
        summary.update({f"{k}_{split}": v for k, v in figures.items()})
        summary["outputs"]["sft_data" if split == "train" else "sft_val_data"] = str(path)
        summary[f"samples_{split}"] = rows[:6]
    return summary


class _Answerer:
    """`(path, key, cap) -> (sft_rows, figures)`: the teacher's answers to a file's prompts,
    in batches of `batch_size` split over the mesh (the last padded: one compiled program).
    Generation stops at any structural token (`<|end|>`, `</s>`, a role token, `<s>`); see
    `clean_answer` for what is kept."""

    def __init__(self, sampler, state, template, d: DistillConfig, seed: int, limit) -> None:
        self.sampler, self.state, self.template, self.d = sampler, state, template, d
        self.key, self.limit = jax.random.key(seed), limit
        self.stops = sorted(set(template.ids.values()))  # every structural id the tokenizer has
        self.ends = {template.ids[END_TOKEN], template.ids["</s>"]}  # the turn's proper ends

    def __call__(self, path: Path, key: str, cap: int) -> tuple[list[dict], dict[str, Any]]:
        d, records = self.d, PromptRecords([path], f"distill.{key}")
        picks, prompts, skipped = [], [], 0
        for i in range(len(records) if not cap else min(cap, len(records))):
            msgs = records[i]["messages"]
            if any(m["role"] == "assistant" for m in msgs):
                raise record_error(
                    records.source, i, f"distill.{key}: a prompt with earlier assistant turns, "
                    "which the student's SFT would learn as the teacher's (black-box distillation "
                    "takes prompts without answers in their history)",
                )  # fmt: skip
            ids = self.template.render(msgs, add_generation_prompt=True).ids
            if self.limit and len(ids) + d.max_new_tokens > self.limit:
                skipped += 1
                continue
            picks.append(i)
            prompts.append(ids)
        res = self._generate(prompts)
        rows, hits, refs = [], 0, 0
        counts = {"empty": 0, "cut": 0, "truncated": 0}
        for i, toks, stopped in zip(picks, res.tokens, res.stopped):
            text, outcome = clean_answer(self.template.tok, toks, stopped, self.ends)
            r = records[i]
            raw = records.source[i]
            ref = r["answer"] if r["answer"] is not None else raw.get("response")
            if isinstance(ref, str):
                refs += 1
                hits += text.strip() == ref.strip()
            if not text.strip():
                counts["empty"] += 1
            elif outcome == "truncated" and not d.keep_truncated:
                counts["truncated"] += 1
            else:
                counts["cut"] += outcome == "cut"
                rows.append(_sft_record(r, text))
        figures = {
            "answers": len(rows),
            "skipped_too_long": skipped,
            "empty_answers": counts["empty"],
            "dropped_truncated": counts["truncated"],
            "cut_at_reserved": counts["cut"],
            "stopped_share": round(float(np.mean(res.stopped)) if picks else 0.0, 4),
            "teacher_exact_match": round(hits / refs, 4) if refs else None,
        }
        return rows, figures

    def _generate(self, prompts: list[list[int]]) -> SampleResult:
        """Batch n samples with `fold_in(key, n)`; every process gets every answer."""
        if not prompts:
            return SampleResult([], [], [], [])
        d = self.d
        return sample_all(
            self.sampler, self.state, prompts, batch_size=d.batch_size,
            key_for=lambda n: jax.random.fold_in(self.key, n), max_new_tokens=d.max_new_tokens,
            temperature=d.sample_temperature, top_p=d.top_p, stop_ids=self.stops,
        )  # fmt: skip


def clean_answer(tok, tokens: list[int], stopped: bool, ends: set[int]) -> tuple[str, str]:
    """`(text, outcome)` of one generated row (`stopped`: its last token is a stop id):
    "ok" (ended by `<|end|>` / `</s>`), "cut" (ended by another structural token, or its
    text held a reserved string such as `<|user|>` spelt by ordinary pieces: cut there, as
    an SFT message may not contain one) or "truncated" (hit `max_new_tokens` unfinished)."""
    body = tokens[:-1] if stopped else tokens
    text = tok.decode(body)
    at = min((j for j in (text.find(s) for s in STRUCTURAL) if j >= 0), default=-1)
    if at >= 0:
        return text[:at], "cut"
    if stopped:
        return text, "ok" if tokens[-1] in ends else "cut"
    return text, "truncated"


def _sft_record(r: dict[str, Any], response: str) -> dict[str, Any]:
    """`{"prompt", "response"}` for a single user turn, else `{"messages"}` (the system
    message and user turns kept), with the record's task."""
    msgs = r["messages"]
    task = {"task": r["task"]} if r.get("task") else {}
    if len(msgs) == 1:
        return {"prompt": msgs[0]["content"], "response": response, **task}
    return {"messages": [*msgs, {"role": "assistant", "content": response}], **task}
