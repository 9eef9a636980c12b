"""`stage: dpo` — direct preference optimisation of an SFT policy against a frozen reference,
or reference-free (SimPO, ORPO).

The policy is `inputs.checkpoint` (LoRA optional, via `peft:`); the reference is the same
checkpoint (or `dpo.reference`) loaded with `load_frozen_model`. A pair's sequence log-prob is
the sum of `token_logprobs` over its response tokens (the loss mask: answer, `<|end|>`,
`</s>`); IPO, SimPO and ORPO use their mean. SimPO and ORPO load no reference at all: the
step runs the policy alone (`training/rl_losses.dpo_loss` has the formulas). Otherwise the
reference either runs in every step, handed to it as `consts` (never trained, donated or
checkpointed), or — `dpo.precompute_reference` — scores every training pair once before the
first step; its log-probs then ride in the batches (`ref_logp` [B, 2], looked up by the
batch's `pair` index), the step runs the policy alone and the reference leaves device memory. The held-out reference log-probs are computed once
either way.

KTO (`dpo.loss: kto`) trains on examples marked good or bad instead of pairs (unpaired
feedback, or each pair as one desirable and one undesirable example): `trainers/kto.py`.

The policy's log-probs are taken without dropout, as the reference's (`dpo.disable_dropout`,
TRL's default), so at step 0 (policy == reference) every margin is exactly 0.

Held-out figures before and after (of every pair, on one host or many; after: of the weights
handed on, with `train.keep_best` the best evaluation's): the DPO margin (mean of
beta ((pi_c - ref_c) - (pi_r - ref_r)), the training metric `margin`, TRL's rewards/margins;
0 before training; reference-free: beta times the difference of the averaged log-probs) and
its pair accuracy (a tie half a win, as the training `accuracy`), and
— meaningful before training too — the raw policy margin log p(chosen) - log p(rejected) and
the pair accuracy by it, overall and by task, and the accuracy by the margin of log-probs
averaged over each answer's tokens (`avg_logp_accuracy`: what SimPO and ORPO rank by). Pairs
cut by `loader.seq_len` are counted (`train_fit`, `val_fit`); those cut to two identical rows
are left out.
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
from jaxllm.data.preference import PAIR_KEYS, make_preference_dataset
from jaxllm.errors import ConfigError
from jaxllm.rundir import RunDir
from jaxllm.sharding import make_mesh, use_rules
from jaxllm.tokenizer.chat import ChatTemplate
from jaxllm.trainers import data_file, kto
from jaxllm.trainers.checkpoint_model import check_same_vocab
from jaxllm.trainers.lm import (
    checkpoint_dir,
    init_from_checkpoint,
    load_frozen_model,
    restore_or_init,
    stage_tokenizer,
)
from jaxllm.trainers.pairs import (
    PairPass,
    by_task,
    fit_report,
    pair_rows,
    pair_wins,
    row_logprobs,
    train_pairs,
    wmean,
)
from jaxllm.training.checkpoint import Checkpointer
from jaxllm.training.optim import lr_schedule, make_optimizer
from jaxllm.training.rl_losses import dpo_loss
from jaxllm.training.state import TrainState
from jaxllm.training.step import make_train_step


def pair_logprobs(
    model, batch: dict[str, jax.Array], key=None, average: bool = False
) -> tuple[jax.Array, jax.Array]:
    """(logp_chosen_B, logp_rejected_B): summed (or, `average`, mean) log-probs of the
    response tokens of each side of a preference batch [B, 2, L]."""
    rows = {k: pair_rows(batch, k) for k in PAIR_KEYS}
    logp_B2 = row_logprobs(model, rows, key, average).reshape(-1, 2)
    return logp_B2[:, 0], logp_B2[:, 1]


def make_dpo_loss(d: DPOConfig, ref_graphdef: nnx.GraphDef | None):
    """`loss_fn(model, batch, key, consts)` with `consts = {"ref": reference state}`, or with
    `ref_graphdef=None` `loss_fn(model, batch, key)` reading the batch's `ref_logp` [B, 2]
    (reference-free losses: no reference at all)."""
    average = d.averaged

    def loss_fn(model, batch, key, consts=None):
        # the reference runs without dropout: so does the policy, unless asked (at step 0,
        # policy == reference, so h = 0 exactly, not dropout noise)
        pi_c_B, pi_r_B = pair_logprobs(model, batch, None if d.disable_dropout else key, average)
        if d.reference_free:
            ref_c_B = ref_r_B = None
        elif consts is None:
            ref_c_B, ref_r_B = batch["ref_logp"][:, 0], batch["ref_logp"][:, 1]
        else:
            ref_c_B, ref_r_B = pair_logprobs(nnx.merge(ref_graphdef, consts["ref"]), batch,
                                             None, average)  # fmt: skip
        loss, aux = dpo_loss(pi_c_B, pi_r_B, ref_c_B, ref_r_B, d.beta, d.label_smoothing,
                             d.loss, batch["weight"], d.gamma, d.discopop_tau)  # fmt: skip
        if not d.rpo_alpha:
            return loss, aux
        # RPO: + alpha x the chosen answer's NLL per token (pi_c is already a mean if averaged)
        n_c_B = jnp.sum(batch["loss_mask"][:, 0].astype(jnp.float32), axis=-1)
        nll_B = -pi_c_B.astype(jnp.float32) / (1.0 if average else jnp.maximum(n_c_B, 1.0))
        nll = jnp.sum(batch["weight"] * nll_B)
        return loss + d.rpo_alpha * nll, {**aux, "nll": jax.lax.stop_gradient(nll)}

    return loss_fn


def reference_table(pass_: PairPass, ref, mesh, rules: str, average: bool) -> np.ndarray:
    """[pairs, 2] reference log-probs (chosen, rejected) of every pair of a `PairPass`."""
    ref_graphdef, ref_state, ref_shardings = ref

    @partial(jax.jit, in_shardings=(ref_shardings, None))
    def fn(ref_state, batch):
        with use_rules(mesh, rules):
            c_B, r_B = pair_logprobs(nnx.merge(ref_graphdef, ref_state), batch, None, average)
        return {"c": c_B, "r": r_B}

    rows = pass_.collect(fn, ref_state)
    table = np.zeros((pass_.size, 2), np.float32)
    real = rows["pair"] >= 0
    table[rows["pair"][real]] = np.stack([rows["c"], rows["r"]], axis=1)[real]
    return table


def _evaluator(cfg: Config, graphdef, shardings, ref, mesh, template, fits: dict):
    """`evaluate(state) -> figures` on `dpo.val_file` (sequence log-probs, summed; its
    `fit_report` into `fits["val_fit"]`); the reference's (`ref`; None: reference-free) are
    computed here, once. The DPO margin is the training one: of log-probs averaged over each
    answer's tokens for IPO, SimPO and ORPO."""
    if not cfg.dpo.val_file:
        return None
    file = data_file(cfg.dpo.val_file, "dpo.val_file")
    pairs, fits["val_fit"] = fit_report("dpo", file, template, cfg.loader.seq_len, "dpo.val_file")
    held_out = PairPass([file], template, cfg.loader, mesh, pairs)
    ref_table = None if ref is None else reference_table(held_out, ref, mesh, cfg.mesh.rules, False)

    def scorer(graphdef, shardings):
        @partial(jax.jit, in_shardings=(shardings, None))
        def fn(state: TrainState, batch):
            with use_rules(mesh, cfg.mesh.rules):
                model = nnx.merge(graphdef, state.params, state.frozen)
                pi_c_B, pi_r_B = pair_logprobs(model, batch)
            n_B2 = jnp.sum(pair_rows(batch, "loss_mask"), axis=1).reshape(-1, 2)
            return {"pi_c": pi_c_B, "pi_r": pi_r_B, "n_c": n_B2[:, 0], "n_r": n_B2[:, 1]}

        return fn

    own = scorer(graphdef, shardings)

    def evaluate(state: TrainState, model=None) -> dict[str, Any]:
        """`model`: another (graphdef, shardings) for `state` (a folded best/)."""
        p = held_out.collect(own if model is None else scorer(*model), state)
        w = (p["weight"] > 0).astype(np.float64)  # every held-out pair counts once
        raw = p["pi_c"] - p["pi_r"]
        n_c, n_r = np.maximum(p["n_c"], 1), np.maximum(p["n_r"], 1)
        h_c, h_r = p["pi_c"], p["pi_r"]  # reference-free: the policy's own
        if ref_table is not None:
            ref_c, ref_r = ref_table[np.maximum(p["pair"], 0)].T
            h_c, h_r = h_c - ref_c, h_r - ref_r
        if cfg.dpo.averaged:  # these log-probs are means over the answer's tokens
            h_c, h_r = h_c / n_c, h_r / n_r
        margin = cfg.dpo.beta * (h_c - h_r)  # as in training
        return {
            "dpo_margin": wmean(margin, w),
            "dpo_accuracy": wmean(pair_wins(margin), w),
            "logp_margin": wmean(raw, w),
            "logp_accuracy": wmean(pair_wins(raw), w),
            "avg_logp_accuracy": wmean(pair_wins(p["pi_c"] / n_c - p["pi_r"] / n_r), w),
            "logp_chosen": wmean(p["pi_c"], w),
            "logp_rejected": wmean(p["pi_r"], w),
            "logp_accuracy_by_task": by_task(pair_wins(raw), p),
            "logp_margin_by_task": by_task(raw, p),
            "pairs": int(np.sum(w)),
        }

    return evaluate


# the last logged training metrics the summary keeps (those the loss has)
_FINAL_TRAIN = ("reward_chosen", "reward_rejected", "margin", "accuracy", "nll", "log_odds",
                "reward_desirable", "reward_undesirable", "kl")  # fmt: skip


def run(cfg: Config, run_dir: RunDir) -> dict[str, Any]:
    """DPO / IPO (and the other losses with a reference, KTO among them) of
    `inputs.checkpoint` on `dpo.train_file` against a frozen reference, or SimPO / ORPO
    without one."""
    d, t = cfg.dpo, cfg.train
    if d.loss == "kto":
        kto.check_batch(cfg)  # before anything is loaded
    mesh = make_mesh(cfg.mesh)
    tx = make_optimizer(t.optim, t.steps)
    start_point = init_from_checkpoint(cfg, tx, mesh)
    graphdef, state, shardings = start_point.graphdef, start_point.state, start_point.shardings
    ref_dir = None if d.reference_free else Path(d.reference or start_point.checkpoint)
    if d.reference and not ref_dir.is_dir():
        raise ConfigError(f"config key 'dpo.reference': {ref_dir} is not a checkpoint directory")
    tok, tok_path = stage_tokenizer(cfg, start_point.meta, start_point.model)
    ref = None
    if ref_dir is not None:
        # no other reference given: the policy's start, quantised as its base is (QLoRA)
        own = None if d.reference else cfg.quantize
        *ref, ref_m, ref_meta = load_frozen_model(ref_dir, mesh, cfg.mesh.rules, quantize=own)
        ref = tuple(ref)  # (graphdef, state, shardings): no other name holds the state
        if d.reference:
            check_same_vocab("dpo.reference", ref_m, ref_meta, start_point.model, tok_path)
    template = ChatTemplate(tok)
    opts = dict(process_index=jax.process_index(), process_count=jax.process_count())
    if d.loss == "kto":  # examples marked good or bad, each with a mismatched row
        ds, fits = kto.train_batches(cfg, template)
    else:
        train_files = [data_file(d.train_file, "dpo.train_file")]
        pairs, fit = fit_report("dpo", train_files[0], template, cfg.loader.seq_len,
                                "dpo.train_file")  # fmt: skip
        fits = {"train_fit": fit}
        ds = make_preference_dataset(train_files, template, cfg.loader, seed=cfg.seed,
                                     records=pairs, **opts)  # fmt: skip
    if d.precompute_reference:
        pass_ = PairPass(train_files, template, cfg.loader, mesh, pairs)
        table = reference_table(pass_, ref, mesh, cfg.mesh.rules, average=d.averaged)
        del pass_  # one pass: its replayable batches go now, not at the end of the stage
        ds = ds.map(lambda b: {**b, "ref_logp": table[np.maximum(b["pair"], 0)]})
    if t.grad_accum > 1:
        ds = ds.batch(t.grad_accum, drop_remainder=True)
    batches = iter(ds)
    held_out = kto.evaluator if d.loss == "kto" and kto.unpaired_val(cfg) else _evaluator
    evaluate = held_out(cfg, graphdef, shardings, ref, mesh, template, fits)
    before = evaluate(state) if evaluate else {}
    ckpt = Checkpointer(checkpoint_dir(run_dir.path), t.keep_checkpoints, t.async_checkpoint)
    state, start = restore_or_init(ckpt, state, shardings, batches)
    sched = lr_schedule(t.optim, t.steps)
    make_loss = kto.make_kto_loss if d.loss == "kto" else make_dpo_loss
    if ref is None or d.precompute_reference:
        del ref  # the reference's work is done (or there is none): only the policy is on device
        step_fn = make_train_step(graphdef, make_dpo_loss(d, None), tx, sched, shardings, mesh,
                                  cfg.mesh.rules, t.grad_accum)  # fmt: skip
    else:
        consts = {"ref": ref[1]}
        step = make_train_step(
            graphdef, make_loss(d, ref[0]), tx, sched, shardings, mesh, cfg.mesh.rules,
            t.grad_accum, const_shardings={"ref": ref[2]},
        )  # fmt: skip
        step_fn = lambda s, b: step(s, b, consts)  # noqa: E731
    summary, last = train_pairs(cfg, start_point, state, start, step_fn, batches, mesh, ckpt,
                                evaluate, before, run_dir, tok_path,
                                rows_per_example=1 if d.loss == "kto" else 2)  # fmt: skip
    for key in _FINAL_TRAIN:
        if key in last:
            summary[f"final_train_{key}"] = last[key]
    summary["reference"] = None if ref_dir is None else str(ref_dir)
    return {**summary, **fits}
