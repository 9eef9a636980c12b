"""`stage: reward` — a Bradley-Terry reward model on preference pairs.

The model is the SFT checkpoint's decoder plus a scalar head (`with_scalar_head`, zero at the
start, so every reward is 0 before training); the reward of a (prompt, response) row is the
head's value at the row's last real token. Batches of B pairs [B, 2, L] run as [2B, L]; the
loss is `pairwise_loss` with the pair weights of `data/preference.py` (a ranking of K answers
gives K(K-1)/2 pairs of weight 1/(K(K-1)/2)) and an optional margin. Held-out figures before
and after training (of every pair, on one host or many: `PairPass`; after: of the weights
handed on, with `train.keep_best` the best evaluation's): pair accuracy (each pair counts
once, a tie as half a win, as the training metric `accuracy` counts too), prompt accuracy
(the same wins weighted by the pair weights, so each prompt counts once), mean reward gap and
accuracy by task. Pairs cut by `loader.seq_len` are counted (`train_fit`, `val_fit`); those
cut to two identical rows are left out (`data/preference.py`).

PPO (and anything else that scores text) uses `reward_model.py`; what the pair stages share
(the held-out pass, the loop and summary) is in `pairs.py`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import Config
from jaxllm.data.preference import make_preference_dataset
from jaxllm.models.heads import with_scalar_head
from jaxllm.rundir import RunDir
from jaxllm.sharding import make_mesh, use_rules
from jaxllm.tokenizer.chat import ChatTemplate
from jaxllm.trainers import data_file
from jaxllm.trainers.lm import (
    checkpoint_dir,
    init_from_checkpoint,
    restore_or_init,
    stage_tokenizer,
)
from jaxllm.trainers.pairs import (
    PairPass,
    by_task,
    fit_report,
    pair_rows,
    pair_wins,
    train_pairs,
    wmean,
)
from jaxllm.trainers.reward_model import sequence_scores
from jaxllm.training.checkpoint import Checkpointer
from jaxllm.training.optim import lr_schedule, make_optimizer
from jaxllm.training.rl_losses import pairwise_loss
from jaxllm.training.state import TrainState
from jaxllm.training.step import make_train_step

# ----------------------------------------------------------------------------- loss


def pair_rewards(model, batch: dict[str, jax.Array], key=None) -> tuple[jax.Array, jax.Array]:
    """(r_chosen_B, r_rejected_B) of a preference batch."""
    r_N = sequence_scores(
        model, pair_rows(batch, "tokens"), pair_rows(batch, "segment_ids"),
        pair_rows(batch, "positions"), key,
    )  # fmt: skip
    r_B2 = r_N.reshape(-1, 2)
    return r_B2[:, 0], r_B2[:, 1]


def reward_loss(margin: float = 0.0):
    """`loss_fn(model, batch, key)`: weighted Bradley-Terry over the batch's pairs."""

    def loss_fn(model, batch, key):
        chosen_B, rejected_B = pair_rewards(model, batch, key)
        weight_B = batch["weight"]
        margin_B = jnp.full_like(chosen_B, margin) if margin else None
        return pairwise_loss(chosen_B, rejected_B, weight_B, margin_B)

    return loss_fn


# ----------------------------------------------------------------------------- held-out


def _reward_evaluator(cfg: Config, graphdef, shardings, mesh, template, fits: dict):
    """`evaluate(state) -> {pair_accuracy, reward_gap, accuracy_by_task, ...}` on val_file
    (its `fit_report` into `fits["val_fit"]`)."""
    if not cfg.reward.val_file:
        return None
    file = data_file(cfg.reward.val_file, "reward.val_file")
    pairs, fits["val_fit"] = fit_report(
        "reward", file, template, cfg.loader.seq_len, "reward.val_file"
    )
    held_out = PairPass([file], template, cfg.loader, mesh, pairs)

    def scorer(graphdef, shardings):
        @partial(jax.jit, in_shardings=(shardings, None))
        def fn(state: TrainState, batch):
            with use_rules(mesh, cfg.mesh.rules):
                model = nnx.merge(graphdef, state.params, state.frozen)
                chosen_B, rejected_B = pair_rewards(model, batch)
            return {"chosen": chosen_B, "rejected": rejected_B}

        return fn

    own = scorer(graphdef, shardings)

    def evaluate(state: TrainState, model=None) -> dict[str, Any]:
        """`model`: another (graphdef, shardings) for `state` (a folded best/)."""
        p = held_out.collect(own if model is None else scorer(*model), state)
        gap, w = p["chosen"] - p["rejected"], p["weight"]
        real, wins = (w > 0).astype(np.float64), pair_wins(gap)
        return {
            "pair_accuracy": wmean(wins, real),  # every held-out pair counts once
            "prompt_accuracy": wmean(wins, w),  # every prompt once: a ranking's pairs share 1
            "reward_gap": wmean(gap, real),
            "reward_chosen": wmean(p["chosen"], real),
            "reward_rejected": wmean(p["rejected"], real),
            "accuracy_by_task": by_task(wins, p),
            "pairs": int(np.sum(real)),
        }

    return evaluate


# ----------------------------------------------------------------------------- the stage


def run(cfg: Config, run_dir: RunDir) -> dict[str, Any]:
    """Trains a reward model on `reward.train_file` starting from `inputs.checkpoint`."""
    t, mesh = cfg.train, make_mesh(cfg.mesh)
    tx = make_optimizer(t.optim, t.steps)
    start_point = init_from_checkpoint(cfg, tx, mesh, wrap=with_scalar_head)
    graphdef, state, shardings = start_point.graphdef, start_point.state, start_point.shardings
    tok, tok_path = stage_tokenizer(cfg, start_point.meta, start_point.model)
    template = ChatTemplate(tok)
    opts = dict(process_index=jax.process_index(), process_count=jax.process_count())
    train_files = [data_file(cfg.reward.train_file, "reward.train_file")]
    pairs, fit = fit_report(
        "reward", train_files[0], template, cfg.loader.seq_len, "reward.train_file"
    )
    fits = {"train_fit": fit}
    ds = make_preference_dataset(train_files, template, cfg.loader, seed=cfg.seed,
                                 records=pairs, **opts)  # fmt: skip
    if t.grad_accum > 1:
        ds = ds.batch(t.grad_accum, drop_remainder=True)
    batches = iter(ds)
    evaluate = _reward_evaluator(cfg, graphdef, shardings, mesh, template, fits)
    before = evaluate(state) if evaluate else {}
    ckpt = Checkpointer(checkpoint_dir(run_dir.path), t.keep_checkpoints, t.async_checkpoint)
    state, start = restore_or_init(ckpt, state, shardings, batches)
    step_fn = make_train_step(
        graphdef, reward_loss(cfg.reward.margin), tx, lr_schedule(t.optim, t.steps), shardings,
        mesh, cfg.mesh.rules, t.grad_accum,
    )  # fmt: skip
    summary, last = train_pairs(cfg, start_point, state, start, step_fn, batches, mesh, ckpt,
                                evaluate, before, run_dir, tok_path)  # fmt: skip
    # under its own key: a pipeline's next stage (ppo) keeps the policy's `checkpoint`
    summary["outputs"]["reward_checkpoint"] = summary["outputs"].pop("checkpoint")
    summary["final_train_accuracy"] = last.get("accuracy")
    return {**summary, **fits}
