"""`stage: reward` — a Bradley-Terry reward model on preference pairs.

The model is the SFT checkpoint's decoder plus a scalar head (`with_scalar_head`, zero at the
start, so every reward is 0 before training); the reward of a (prompt, response) row is the
head's value at the row's last real token. Batches of B pairs [B, 2, L] run as [2B, L]; the
loss is `pairwise_loss` with the pair weights of `data/preference.py` (a ranking of K answers
gives K(K-1)/2 pairs of weight 1/(K(K-1)/2)) and an optional margin. Held-out figures before
and after training (of every pair, on one host or many: `PairPass`): pair accuracy (each
pair counts once, a tie as half a win: the usual definition, as in TRL's reward trainer and
RewardBench), prompt accuracy (the same wins weighted by the pair weights, so each prompt
counts once), mean reward gap and accuracy by task.

PPO (and anything else that scores text) uses `load_reward_model` + `reward_scores`.
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
from jaxllm.data.preference import (
    PreferenceRecords,
    make_preference_dataset,
    make_preference_eval_dataset,
)
from jaxllm.models.heads import last_token_index, with_scalar_head
from jaxllm.rundir import RunDir
from jaxllm.sharding import make_mesh, use_rules
from jaxllm.tokenizer.chat import ChatTemplate
from jaxllm.trainers import data_file
from jaxllm.trainers.lm import (
    checkpoint_dir,
    init_from_checkpoint,
    load_frozen_model,
    loop_spec,
    param_figures,
    restore_or_init,
    stage_tokenizer,
)
from jaxllm.training.checkpoint import Checkpointer
from jaxllm.training.loop import run_loop
from jaxllm.training.metrics import plot_losses
from jaxllm.training.optim import lr_schedule, make_optimizer
from jaxllm.training.rl_losses import pairwise_loss
from jaxllm.training.state import TrainState, to_global
from jaxllm.training.step import make_train_step

# ----------------------------------------------------------------------------- scoring API


def load_reward_model(ckpt_dir: str | Path, mesh, rules: str = "dp"):
    """A `stage: reward` checkpoint as a fixed model (LoRA merged) for scoring or as PPO
    `consts`: `(graphdef, state, shardings, model_cfg, meta)`; `meta["tokenizer"]` names
    its tokenizer."""
    return load_frozen_model(Path(ckpt_dir), mesh, rules, wrap=with_scalar_head)


def sequence_scores(model, tokens_BL, segment_ids_BL, positions_BL, key=None) -> jax.Array:
    """r_B: the scalar model's value at each row's last real token (segment id > 0)."""
    s_BL = model(
        tokens_BL,
        positions_BL=positions_BL,
        segment_ids_BL=segment_ids_BL,
        deterministic=key is None,
        key=key,
    )
    idx_B = last_token_index(segment_ids_BL)
    return jnp.take_along_axis(s_BL, idx_B[:, None], axis=1)[:, 0]


@partial(jax.jit, static_argnums=0)
def reward_scores(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens_BL: jax.Array,
    segment_ids_BL: jax.Array,
    positions_BL: jax.Array,
) -> jax.Array:
    """r_B (f32) of rows of prompt + response: jitted, `graphdef` static, `state` from
    `load_reward_model`. Rows may be left- or right-padded: padding has segment id 0; the
    reward is read at the last position with segment id > 0."""
    model = nnx.merge(graphdef, state)
    return sequence_scores(model, tokens_BL, segment_ids_BL, positions_BL)


# ----------------------------------------------------------------------------- loss


def pair_rows(batch: dict[str, jax.Array], key: str) -> jax.Array:
    """[B, 2, L] → [2B, L] (rows 2i chosen, 2i + 1 rejected)."""
    x = batch[key]
    return x.reshape(x.shape[0] * 2, *x.shape[2:])


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


class PairPass:
    """One ordered pass over preference files that gives the same figures on one host or
    many: every process scores its share of the pairs (all with the same number of
    batches), and `collect` gathers each batch's per-pair outputs to every process, so the
    figures cover all pairs. Rows are keyed by `pair` (the pair's index in the files) —
    how `task` is found, and how per-pair tables (DPO's reference log-probs) are indexed."""

    def __init__(self, files: list[Path], template, loader, mesh) -> None:
        import math

        from jaxllm.data.pipeline import local_batch_size

        self.files, self.template, self.loader, self.mesh = files, template, loader, mesh
        records = PreferenceRecords(files)
        self.size = len(records)
        self.tasks = np.array([records[i].task or "all" for i in range(self.size)])
        pc = jax.process_count()
        share = math.ceil(self.size / pc)
        self.num_batches = math.ceil(share / local_batch_size(loader, pc))
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self._gather = jax.jit(lambda tree: tree, out_shardings=replicated)

    def collect(self, fn, *args) -> dict[str, np.ndarray]:
        """Runs `fn(*args, global_batch) -> {name: [B]}` over the batches; the rows of every
        process with their `weight`, `pair` and `task` (padding rows: weight 0, pair -1)."""
        batches = make_preference_eval_dataset(
            self.files, self.template, self.loader, process_index=jax.process_index(),
            process_count=jax.process_count(), num_batches=self.num_batches,
        )  # fmt: skip
        out: dict[str, list] = {}
        for batch in batches:
            g = to_global(batch, self.mesh)
            vals = jax.device_get(self._gather({**fn(*args, g), "weight": g["weight"],
                                                "pair": g["pair"]}))  # fmt: skip
            for k, v in vals.items():
                out.setdefault(k, []).append(np.asarray(v, np.int64 if k == "pair" else np.float64))
        rows = {k: np.concatenate(v) for k, v in out.items()}
        rows["task"] = np.where(rows["pair"] >= 0, self.tasks[np.maximum(rows["pair"], 0)], "")
        return rows


def pair_wins(gap: np.ndarray) -> np.ndarray:
    """1 where the chosen answer scores higher, 0 where lower, 1/2 on a tie (so an untrained,
    zero-initialised head stands at chance, 0.5)."""
    return np.where(gap > 0, 1.0, np.where(gap == 0, 0.5, 0.0))


def by_task(values: np.ndarray, rows: dict[str, np.ndarray]) -> dict:
    """{task: mean of values over its real pairs} (weight > 0 rows of a `collect`)."""
    out = {}
    for t in sorted(set(rows["task"][rows["weight"] > 0])):
        out[str(t)] = wmean(values, (rows["weight"] > 0) & (rows["task"] == t))
    return out


def wmean(values: np.ndarray, weight: np.ndarray) -> float:
    return round(float(np.sum(weight * values) / max(np.sum(weight), 1e-9)), 4)


def _reward_evaluator(cfg: Config, graphdef, shardings, mesh, template):
    """`evaluate(state) -> {pair_accuracy, reward_gap, accuracy_by_task, ...}` on val_file."""
    if not cfg.reward.val_file:
        return None
    held_out = PairPass([data_file(cfg.reward.val_file, "reward.val_file")], template,
                        cfg.loader, mesh)  # fmt: skip

    @partial(jax.jit, in_shardings=(shardings, None))
    def fn(state: TrainState, batch):
        with use_rules(mesh, cfg.mesh.rules):
            model = nnx.merge(graphdef, state.params, state.frozen)
            chosen_B, rejected_B = pair_rewards(model, batch)
        return {"chosen": chosen_B, "rejected": rejected_B}

    def evaluate(state: TrainState) -> dict[str, Any]:
        p = held_out.collect(fn, state)
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


def scalar_figures(figures: dict[str, Any]) -> dict[str, float]:
    """The float entries of an evaluation (what the loop logs as eval_*)."""
    return {k: v for k, v in figures.items() if isinstance(v, float)}


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
    ds = make_preference_dataset(train_files, template, cfg.loader, seed=cfg.seed, **opts)
    if t.grad_accum > 1:
        ds = ds.batch(t.grad_accum, drop_remainder=True)
    batches = iter(ds)
    evaluate = _reward_evaluator(cfg, graphdef, shardings, mesh, template)
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
    return summary


def train_pairs(
    cfg, start_point, state, start, step_fn, batches, mesh, ckpt, evaluate, before, run_dir,
    tok_path,
) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """What the pair stages (reward, dpo) share after their setup: the loop from `start`,
    the held-out figures after it, the loss plot and the summary (with the parameter
    figures). Returns `(summary, last logged metrics)`."""
    eval_fn = (lambda s: scalar_figures(evaluate(s))) if evaluate else None
    meta = start_point.checkpoint_meta(cfg, tok_path)
    spec = loop_spec(cfg, step_fn, batches, mesh, eval_fn, meta, rows_per_example=2)
    state, last = run_loop(spec, state, ckpt, run_dir.path)
    ckpt.close()
    after = evaluate(state) if evaluate else {}
    plot = plot_losses(run_dir.path / "metrics.jsonl", run_dir.path / "loss.png", cfg.name)
    summary = stage_summary(cfg, start, last, before, after, plot, run_dir, tok_path)
    return {**param_figures(start_point, run_dir.path), **summary}, last


def stage_summary(cfg, start, last, before, after, plot, run_dir, tok_path) -> dict[str, Any]:
    """Steps, final train loss, every held-out figure as `<name>_before` / `<name>_after`."""
    summary: dict[str, Any] = {
        "steps": cfg.train.steps,
        "resumed_from_step": start,
        "final_train_loss": last.get("loss"),
        "tokens_per_s": last.get("tokens_per_s"),
    }
    for key in before:
        summary[f"{key}_before"], summary[f"{key}_after"] = before[key], after[key]
    summary["loss_plot"] = plot.name if plot else None
    summary["outputs"] = {
        "checkpoint": str(checkpoint_dir(run_dir.path)),
        "tokenizer": str(tok_path),
    }
    return summary
