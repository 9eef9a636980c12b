"""`stage: pretrain` — next-token training of a decoder on packed sequences from the cleaned
corpus, with periodic validation, checkpoints and resume."""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Any

import jax

from jaxllm.config import Config, replace, to_dict
from jaxllm.data.pipeline import encode_documents, make_eval_dataset, make_lm_dataset
from jaxllm.data.sources import cleaned_shards, iter_cleaned
from jaxllm.models.flops import param_count, train_flops_per_token
from jaxllm.rundir import RunDir
from jaxllm.sharding import make_mesh
from jaxllm.tokenizer import Tokenizer
from jaxllm.trainers import require_input
from jaxllm.trainers.continued import (
    checkpoint_model_config,
    checkpoint_tokenizer,
    continued_model,
    load_into,
)
from jaxllm.trainers.held_out import make_evaluator, unigram_cross_entropy
from jaxllm.trainers.lm import (
    best_figures,
    best_state,
    checkpoint_dir,
    keep_tokenizer,
    kernel_choices,
    lm_loss,
    load_model_tokenizer,
    loop_spec,
    model_fn,
    output_checkpoint,
    resolve_loss_chunk,
    resolve_model,
    restore_or_init,
)
from jaxllm.training.checkpoint import Checkpointer
from jaxllm.training.loop import run_loop
from jaxllm.training.metrics import plot_losses
from jaxllm.training.optim import lr_schedule, make_optimizer
from jaxllm.training.peak import device_peak_flops
from jaxllm.training.state import count_params, create_train_state
from jaxllm.training.step import make_eval_step, make_train_step


def run(cfg: Config, run_dir: RunDir) -> dict[str, Any]:
    """From fresh weights, or from `inputs.checkpoint` (continued pretraining: continued.py)."""
    start_from = cfg.inputs.checkpoint
    if start_from:
        ckpt_m = checkpoint_model_config(start_from)
        cfg = replace(cfg, model=continued_model(cfg, ckpt_m))
        tok_file = cfg.inputs.tokenizer or checkpoint_tokenizer(start_from)
        tok = load_model_tokenizer(tok_file, cfg.model)
    else:
        tok = Tokenizer.load(require_input(cfg, "tokenizer"))
    tok_path = keep_tokenizer(tok, run_dir.path)  # the run holds its tokenizer: it can move
    data_dir = require_input(cfg, "data_dir")
    m = resolve_model(cfg, tok.vocab_size)
    t = cfg.train
    mesh = make_mesh(cfg.mesh)
    tx = make_optimizer(t.optim, t.steps)
    graphdef, state, shardings = create_train_state(
        model_fn(m, cfg.seed), tx, mesh, cfg.mesh.rules, cfg.seed
    )
    if start_from:
        state = load_into(state, shardings, cfg, mesh)
    pi, pc = jax.process_index(), jax.process_count()
    train_ds = make_lm_dataset(
        cleaned_shards(data_dir, "train"),
        tok,
        cfg.loader,
        seed=cfg.seed,
        process_index=pi,
        process_count=pc,
    )
    if t.grad_accum > 1:
        train_ds = train_ds.batch(t.grad_accum, drop_remainder=True)
    batches = iter(train_ds)
    ckpt = Checkpointer(checkpoint_dir(run_dir.path), t.keep_checkpoints, t.async_checkpoint)
    state, start = restore_or_init(ckpt, state, shardings, batches)

    loss_fn = lm_loss(t.z_loss, resolve_loss_chunk(cfg))
    step_fn = make_train_step(
        graphdef,
        loss_fn,
        tx,
        lr_schedule(t.optim, t.steps),
        shardings,
        mesh,
        cfg.mesh.rules,
        t.grad_accum,
    )
    eval_step = make_eval_step(graphdef, loss_fn, shardings, mesh, cfg.mesh.rules)
    val_shards = cleaned_shards(data_dir, "val")

    def val_batches(num_batches: int | None):
        return make_eval_dataset(
            val_shards, tok, cfg.loader, process_index=pi, process_count=pc,
            num_batches=num_batches,
        )  # fmt: skip

    evaluate = make_evaluator(eval_step, val_batches, mesh, t.eval_batches)
    tokens_per_step = cfg.loader.batch_size * cfg.loader.seq_len * t.grad_accum
    spec = loop_spec(
        cfg, step_fn, batches, mesh, evaluate if val_shards else None,
        meta={"config": to_dict(cfg), "model": to_dict(m), "tokenizer": str(tok_path)},
        flops_per_step=train_flops_per_token(m, cfg.loader.seq_len) * tokens_per_step,
        peak_flops=device_peak_flops() * jax.device_count(),
    )  # fmt: skip
    state, last = run_loop(spec, state, ckpt, run_dir.path)
    ckpt.close()
    plot = plot_losses(run_dir.path / "metrics.jsonl", run_dir.path / "loss.png", cfg.name)
    summary = {
        "params": count_params(state.params),
        "params_formula": param_count(m),
        "steps": t.steps,
        "resumed_from_step": start,
        "started_from": start_from or None,
        "tokens_seen": tokens_per_step * last.get("stopped_early_at", t.steps),
        "final_train_loss": last.get("loss"),
        "tokens_per_s": last.get("tokens_per_s"),
        "mfu": last.get("mfu"),
        **kernel_choices(cfg, m),
        "loss_plot": plot.name if plot else None,
        **best_figures(last),
        "outputs": {"checkpoint": output_checkpoint(cfg, run_dir.path), "tokenizer": str(tok_path)},
    }
    if val_shards:
        final = {k[len("eval_") :]: v for k, v in last.items() if k.startswith("eval_")}
        if t.keep_best and last.get("best_step") != int(state.step):
            # the figures of what the run hands on: best/, not the last state
            # (a pretrain run's best/ is never folded: best_state needs the shardings alone)
            start_point = SimpleNamespace(graphdef=graphdef, shardings=shardings)
            kept, _ = best_state(cfg, run_dir.path, start_point, state, mesh)
            final = evaluate(kept)
        summary.update({f"val_{k}": v for k, v in final.items()})
        summary["unigram_val_loss"] = _unigram(tok, data_dir)
    return summary


def _unigram(tok: Tokenizer, data_dir) -> float:
    """The unigram baseline on the same validation tokens (first 20k train docs to fit)."""

    def ids(split, limit):
        texts = [r["text"] for r in itertools.islice(iter_cleaned(data_dir, split), limit)]
        return encode_documents(tok, texts)

    return round(unigram_cross_entropy(ids("train", 20000), ids("val", 10**9), tok.vocab_size), 4)
