"""`stage: dpo` — direct preference optimisation of an SFT policy against a frozen reference.

The policy is `inputs.checkpoint` (LoRA optional, via `peft:`); the reference is the same
checkpoint (or `dpo.reference`) loaded with `load_frozen_model` and handed to the step as
`consts` (never trained, donated or checkpointed). A pair's sequence log-prob is the sum of
`token_logprobs` over its response tokens (the loss mask: answer, `<|end|>`, `</s>`); IPO uses
their mean. Both models run every step: the reference is not precomputed.

Held-out figures before and after: the DPO margin (mean of (pi_c - ref_c) - (pi_r - ref_r),
0 before training) and its pair accuracy, and — meaningful before training too — the raw
policy margin log p(chosen) - log p(rejected) and the pair accuracy by it, overall and by task.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import Config
from jaxllm.config.alignment import DPOConfig
from jaxllm.data.preference import make_preference_dataset, make_preference_eval_dataset
from jaxllm.errors import ConfigError
from jaxllm.rundir import RunDir
from jaxllm.sharding import make_mesh, use_rules
from jaxllm.tokenizer.chat import ChatTemplate
from jaxllm.trainers.lm import (
    checkpoint_dir,
    finetune_spec,
    init_from_checkpoint,
    load_frozen_model,
    load_model_tokenizer,
    param_figures,
    restore_or_init,
)
from jaxllm.trainers.reward import (
    collect_pairs,
    data_file,
    pair_rows,
    pair_tasks,
    scalar_figures,
    stage_summary,
    weighted_by_task,
    wmean,
)
from jaxllm.training.checkpoint import Checkpointer
from jaxllm.training.loop import run_loop
from jaxllm.training.losses import token_logprobs
from jaxllm.training.metrics import plot_losses
from jaxllm.training.optim import lr_schedule, make_optimizer
from jaxllm.training.rl_losses import dpo_loss
from jaxllm.training.state import TrainState
from jaxllm.training.step import make_train_step


def pair_logprobs(
    model, batch: dict[str, jax.Array], key=None, average: bool = False
) -> tuple[jax.Array, jax.Array]:
    """(logp_chosen_B, logp_rejected_B): summed (or, `average`, mean) log-probs of the
    response tokens of each side of a preference batch [B, 2, L]."""
    logits_NLV = model(
        pair_rows(batch, "tokens"),
        positions_BL=pair_rows(batch, "positions"),
        segment_ids_BL=pair_rows(batch, "segment_ids"),
        deterministic=key is None,
        key=key,
    )
    mask_NL = pair_rows(batch, "loss_mask").astype(jnp.float32)
    logp_N = jnp.sum(token_logprobs(logits_NLV, pair_rows(batch, "targets")) * mask_NL, axis=1)
    if average:
        logp_N = logp_N / jnp.maximum(jnp.sum(mask_NL, axis=1), 1.0)
    logp_B2 = logp_N.reshape(-1, 2)
    return logp_B2[:, 0], logp_B2[:, 1]


def make_dpo_loss(d: DPOConfig, ref_graphdef: nnx.GraphDef):
    """`loss_fn(model, batch, key, consts)` with `consts = {"ref": reference state}`."""
    average = d.loss == "ipo"

    def loss_fn(model, batch, key, consts):
        pi_c_B, pi_r_B = pair_logprobs(model, batch, key, average)
        ref = nnx.merge(ref_graphdef, consts["ref"])
        ref_c_B, ref_r_B = pair_logprobs(ref, batch, None, average)
        return dpo_loss(
            pi_c_B, pi_r_B, ref_c_B, ref_r_B, d.beta, d.label_smoothing, d.loss, batch["weight"]
        )

    return loss_fn


def _evaluator(cfg: Config, graphdef, shardings, ref, mesh, template, opts):
    """`evaluate(state) -> figures` on `dpo.val_file` (sequence log-probs, summed)."""
    if not cfg.dpo.val_file:
        return None
    files = [data_file(cfg.dpo.val_file, "dpo.val_file")]
    tasks = pair_tasks(files) if opts["process_count"] == 1 else []
    ref_graphdef, ref_state, ref_shardings = ref

    @partial(jax.jit, in_shardings=(shardings, None, ref_shardings))
    def fn(state: TrainState, batch, ref_state):
        with use_rules(mesh, cfg.mesh.rules):
            pi_c_B, pi_r_B = pair_logprobs(nnx.merge(graphdef, state.params, state.frozen), batch)
            ref_c_B, ref_r_B = pair_logprobs(nnx.merge(ref_graphdef, ref_state), batch)
        return {"pi_c": pi_c_B, "pi_r": pi_r_B, "ref_c": ref_c_B, "ref_r": ref_r_B}

    def evaluate(state: TrainState) -> dict[str, Any]:
        batches = make_preference_eval_dataset(files, template, cfg.loader, **opts)
        p = collect_pairs(lambda s, b: fn(s, b, ref_state), state, batches, mesh)
        w = p["weight"]
        raw = p["pi_c"] - p["pi_r"]
        h = (p["pi_c"] - p["ref_c"]) - (p["pi_r"] - p["ref_r"])
        return {
            "dpo_margin": wmean(h, w),
            "dpo_accuracy": wmean(h > 0, w),
            "logp_margin": wmean(raw, w),
            "logp_accuracy": wmean(raw > 0, w),
            "logp_chosen": wmean(p["pi_c"], w),
            "logp_rejected": wmean(p["pi_r"], w),
            "logp_accuracy_by_task": weighted_by_task(raw > 0, w, tasks) if tasks else {},
            "logp_margin_by_task": weighted_by_task(raw, w, tasks) if tasks else {},
            "pairs": int(np.sum(w > 0)),
        }

    return evaluate


def run(cfg: Config, run_dir: RunDir) -> dict[str, Any]:
    """DPO / IPO of `inputs.checkpoint` on `dpo.train_file` against a frozen reference."""
    d, t, mesh = cfg.dpo, cfg.train, make_mesh(cfg.mesh)
    tx = make_optimizer(t.optim, t.steps)
    start_point = init_from_checkpoint(cfg, tx, mesh)
    graphdef, state, shardings = start_point.graphdef, start_point.state, start_point.shardings
    ref_dir = Path(d.reference or start_point.checkpoint)
    if d.reference and not ref_dir.is_dir():
        raise ConfigError(f"config key 'dpo.reference': {ref_dir} is not a checkpoint directory")
    ref_graphdef, ref_state, ref_shardings, _, _ = load_frozen_model(ref_dir, mesh, cfg.mesh.rules)
    tok_path = cfg.inputs.tokenizer or start_point.meta.get("tokenizer", "")
    template = ChatTemplate(load_model_tokenizer(tok_path, start_point.model))
    opts = dict(process_index=jax.process_index(), process_count=jax.process_count())
    train_files = [data_file(d.train_file, "dpo.train_file")]
    ds = make_preference_dataset(train_files, template, cfg.loader, seed=cfg.seed, **opts)
    if t.grad_accum > 1:
        ds = ds.batch(t.grad_accum, drop_remainder=True)
    batches = iter(ds)
    ref = (ref_graphdef, ref_state, ref_shardings)
    evaluate = _evaluator(cfg, graphdef, shardings, ref, mesh, template, opts)
    before = evaluate(state) if evaluate else {}
    ckpt = Checkpointer(checkpoint_dir(run_dir.path), t.keep_checkpoints, t.async_checkpoint)
    state, start = restore_or_init(ckpt, state, shardings, batches)
    step_fn = make_train_step(
        graphdef, make_dpo_loss(d, ref_graphdef), tx, lr_schedule(t.optim, t.steps), shardings,
        mesh, cfg.mesh.rules, t.grad_accum, const_shardings={"ref": ref_shardings},
    )  # fmt: skip
    consts = {"ref": ref_state}
    eval_fn = (lambda s: scalar_figures(evaluate(s))) if evaluate else None
    meta = start_point.checkpoint_meta(cfg, tok_path)
    spec = finetune_spec(
        cfg, lambda s, b: step_fn(s, b, consts), batches, mesh, eval_fn, meta, rows_per_example=2
    )
    state, last = run_loop(spec, state, ckpt, run_dir.path)
    ckpt.close()
    after = evaluate(state) if evaluate else {}
    plot = plot_losses(run_dir.path / "metrics.jsonl", run_dir.path / "loss.png", cfg.name)
    summary = stage_summary(cfg, start, last, before, after, plot, run_dir, tok_path)
    for key in ("reward_chosen", "reward_rejected", "margin", "accuracy"):
        summary[f"final_train_{key}"] = last.get(key)
    summary["reference"] = str(ref_dir)
    return {**param_figures(start_point, run_dir.path), **summary}
