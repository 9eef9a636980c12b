"""What the preference-pair stages (`reward`, `dpo`) share: how the pairs of a file fit
`loader.seq_len` (`fit_report`), the held-out pass over pairs that gives the same figures on
one host or many (`PairPass`), win rates and weighted means by task, and the loop + summary
after a pair stage's setup (`train_pairs`, whose figures after training are the weights it
hands on: with `train.keep_best`, the best evaluation's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxllm.data.preference import (
    PAIR_KEYS,
    PreferenceRecords,
    fit_pairs,
    make_preference_eval_dataset,
    open_pairs,
)
from jaxllm.errors import ConfigError
from jaxllm.trainers.held_out import Replayed
from jaxllm.trainers.lm import (
    best_figures,
    best_state,
    loop_spec,
    output_checkpoint,
    param_figures,
)
from jaxllm.training.loop import run_loop
from jaxllm.training.metrics import plot_losses
from jaxllm.training.state import to_global


def pair_rows(batch: dict[str, jax.Array], key: str) -> jax.Array:
    """[B, 2, L] → [2B, L] (rows 2i chosen, 2i + 1 rejected)."""
    x = batch[key]
    return x.reshape(x.shape[0] * 2, *x.shape[2:])


def add_mismatched_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch plus `kl_<key>` [B, 2, L] for each of `PAIR_KEYS`: row (i, s) is pair i's
    prompt followed by side s's answer of the next real pair of the batch (cyclically;
    padding rows, weight 0, stay zero) — mismatched prompt/answer rows whose log-ratios
    estimate KL(pi || ref), KTO's reference point (`rl_losses.kto_loss`), as TRL pairs
    each prompt with the next example's answer. Built on the host from the rows themselves:
    the prompt is a row's tokens up to its first answer target, the answer its masked
    targets (an answer cut in its own row stays cut); the new row is cut to L like any
    other."""
    tokens, targets, mask = batch["tokens"], batch["targets"], batch["loss_mask"]
    B, _, L = tokens.shape
    out = {f"kl_{k}": np.zeros_like(np.asarray(batch[k])) for k in PAIR_KEYS}
    real = np.flatnonzero(np.asarray(batch["weight"]) > 0)
    for n, i in enumerate(real):
        j = real[(n + 1) % len(real)]
        for s in (0, 1):
            first = np.flatnonzero(mask[i, s])[0]  # targets from here on are the answer's
            seq = np.concatenate([tokens[i, s, : first + 1], targets[j, s][mask[j, s] > 0]])
            size = min(len(seq) - 1, L)
            out["kl_tokens"][i, s, :size] = seq[:size]
            out["kl_targets"][i, s, :size] = seq[1 : size + 1]
            out["kl_loss_mask"][i, s, first:size] = 1
            out["kl_segment_ids"][i, s, :size] = 1
            out["kl_positions"][i, s, :size] = np.arange(size)
    return {**batch, **out}


def mismatched(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The `kl_*` rows of `add_mismatched_rows` as a pair batch of their own."""
    return {k: batch[f"kl_{k}"] for k in PAIR_KEYS}


def fit_report(stage: str, file: Path, template, seq_len: int, key: str = ""):
    """`(records, fit)`: the pairs of a preference file that do not cut to two identical
    rows at `seq_len` (`open_pairs`, for the batches) and `fit_pairs`'s counts, said (as
    SFT says its cut conversations) when a pair is cut; refuses a file whose every pair is
    cut to two identical rows (nothing to learn or score). `key`: the config key naming
    `file`, for the message about a file without records."""
    records = PreferenceRecords([file], key)
    keep, fit = fit_pairs(records, template, seq_len)
    if fit["cut"] and jax.process_index() == 0:
        print(f"{stage}: {fit['cut']} of {fit['pairs']} pairs in {file} are longer than "
              f"loader.seq_len {seq_len} and cut (an answer's end lost); {fit['identical']} of "
              f"them cut to two identical rows ({fit['without_answer']} before any answer "
              "token) and left out")  # fmt: skip
    if fit["pairs"] and not keep.any():
        raise ConfigError(
            f"config key 'loader.seq_len': {seq_len} cuts every pair in {file} to two "
            "identical rows (the prompt or the answers' common start fills it); raise it"
        )
    return records.select(keep), fit


class PairPass:
    """One ordered pass over preference files that gives the same figures on one host or
    many: every process scores its share of the pairs (all with the same number of
    batches), and `collect` gathers each batch's per-pair outputs to every process, so the
    figures cover all pairs. Rows are keyed by `pair` (the pair's index in the files) —
    how `task` is found, and how per-pair tables (DPO's reference log-probs) are indexed.
    `records`: `open_pairs(files)` (pairs cut to identical rows left out), if already made."""

    def __init__(self, files: list[Path], template, loader, mesh, records=None) -> None:
        import math

        from jaxllm.data.pipeline import local_batch_size

        self.files, self.template, self.loader, self.mesh = files, template, loader, mesh
        if records is None:
            records = open_pairs(files, template, loader.seq_len)[0]
        self.records = records
        self.size = records.total  # `pair` indexes all pairs of the files
        self.tasks = np.full(self.size, "all", dtype=object)
        for i in range(len(records)):
            pair = records[i]
            self.tasks[pair.index] = pair.task or "all"
        self.tasks = self.tasks.astype(str)
        pc = jax.process_count()
        share = math.ceil(len(records) / pc)
        self.num_batches = math.ceil(share / local_batch_size(loader, pc))
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self._gather = jax.jit(lambda tree: tree, out_shardings=replicated)
        self.batches = Replayed(lambda: make_preference_eval_dataset(
            files, template, loader, process_index=jax.process_index(),
            process_count=pc, num_batches=self.num_batches, records=records,
        ))  # fmt: skip

    def collect(self, fn, *args) -> dict[str, np.ndarray]:
        """Runs `fn(*args, global_batch) -> {name: [B]}` over the batches (rendered once, then
        replayed); the rows of every process with their `weight`, `pair` and `task` (padding
        rows: weight 0, pair -1)."""
        out: dict[str, list] = {}
        for batch in self.batches:
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
    zero-initialised head stands at chance, 0.5): the training metrics' `accuracy` counts the
    same way (`rl_losses`)."""
    return np.where(gap > 0, 1.0, np.where(gap == 0, 0.5, 0.0))


def by_task(values: np.ndarray, rows: dict[str, np.ndarray]) -> dict:
    """{task: mean of values over its real pairs} (weight > 0 rows of a `collect`)."""
    out = {}
    for t in sorted(set(rows["task"][rows["weight"] > 0])):
        out[str(t)] = wmean(values, (rows["weight"] > 0) & (rows["task"] == t))
    return out


def wmean(values: np.ndarray, weight: np.ndarray) -> float:
    return round(float(np.sum(weight * values) / max(np.sum(weight), 1e-9)), 4)


def scalar_figures(figures: dict[str, Any]) -> dict[str, float]:
    """The float entries of an evaluation (what the loop logs as eval_*)."""
    return {k: v for k, v in figures.items() if isinstance(v, float)}


def train_pairs(
    cfg, start_point, state, start, step_fn, batches, mesh, ckpt, evaluate, before, run_dir,
    tok_path,
) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """What the pair stages (reward, dpo) share after their setup: the loop from `start`,
    the held-out figures after it (of the weights handed on: with `train.keep_best` the best
    evaluation's), the loss plot and the summary (with the parameter figures). `evaluate`
    is `evaluate(state, model=None)`, `model` a `(graphdef, shardings)` other than the
    run's (a folded PEFT best/). Returns `(summary, last logged metrics)`."""
    eval_fn = (lambda s: scalar_figures(evaluate(s))) if evaluate else None
    meta = start_point.checkpoint_meta(cfg, tok_path)
    spec = loop_spec(
        cfg, step_fn, batches, mesh, eval_fn, meta, rows_per_example=2,
        final_save=start_point.final_save,
    )  # fmt: skip
    state, last = run_loop(spec, state, ckpt, run_dir.path)
    ckpt.close()
    after = {}
    if evaluate:
        state, model = best_state(cfg, run_dir.path, start_point, state, mesh)
        after = evaluate(state, model)
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
    summary.update(best_figures(last))
    summary["outputs"] = {
        "checkpoint": output_checkpoint(cfg, run_dir.path),
        "tokenizer": str(tok_path),
    }
    return summary
