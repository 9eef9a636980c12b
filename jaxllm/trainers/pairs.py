"""What the preference-pair stages (`reward`, `dpo`) share: how the pairs of a file fit
`loader.seq_len` (`fit_report`), the held-out pass over pairs that gives the same figures on
one host or many (`PairPass`), win rates and weighted means by task, and the loop + summary
after a pair stage's setup (`train_pairs`, whose figures after training are the weights it
hands on: with `train.keep_best`, the best evaluation's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.data.preference import (
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
from jaxllm.training.losses import token_logprobs
from jaxllm.training.metrics import plot_losses
from jaxllm.training.state import to_global


def pair_rows(batch: dict[str, jax.Array], key: str) -> jax.Array:
    """[B, 2, L] → [2B, L] (rows 2i chosen, 2i + 1 rejected)."""
    x = batch[key]
    return x.reshape(x.shape[0] * 2, *x.shape[2:])


def row_logprobs(model, rows: dict[str, jax.Array], key=None, average: bool = False):
    """[N]: summed (or, `average`, mean) log-probs of each row's masked targets (its answer),
    rows [N, L] of `PAIR_KEYS`; `key` None: without dropout."""
    logits_NLV = model(rows["tokens"], positions_BL=rows["positions"],
                       segment_ids_BL=rows["segment_ids"], deterministic=key is None, key=key)  # fmt: skip
    mask_NL = rows["loss_mask"].astype(jnp.float32)
    logp_N = jnp.sum(token_logprobs(logits_NLV, rows["targets"]) * mask_NL, axis=1)
    if average:
        logp_N = logp_N / jnp.maximum(jnp.sum(mask_NL, axis=1), 1.0)
    return logp_N


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


class HeldOutPass:
    """One ordered pass over held-out rows that gives the same figures on one host or many:
    every process scores its share (all with the same number of batches), and `collect`
    gathers each batch's per-row outputs to every process, so the figures cover all rows.
    Rows are keyed by their index in the files (`key`: "pair" for preference pairs), which
    is how `task` is found and how per-row tables (reference log-probs) are indexed.
    `records`: random access to items with `.task` and `.index` (and `total`, the size of the
    index); `dataset(process_count, num_batches)`: this process's eval batches."""

    def __init__(self, records, loader, mesh, dataset, key: str) -> None:
        import math

        from jaxllm.data.pipeline import local_batch_size

        self.records, self.mesh, self.key = records, mesh, key
        self.size = records.total  # the index covers all rows of the files
        self.tasks = np.full(self.size, "all", dtype=object)
        for i in range(len(records)):
            item = records[i]
            self.tasks[item.index] = item.task or "all"
        self.tasks = self.tasks.astype(str)
        pc = jax.process_count()
        self.num_batches = math.ceil(math.ceil(len(records) / pc) / local_batch_size(loader, pc))
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self._gather = jax.jit(lambda tree: tree, out_shardings=replicated)
        self.batches = Replayed(lambda: dataset(pc, self.num_batches))

    def collect(self, fn, *args) -> dict[str, np.ndarray]:
        """Runs `fn(*args, global_batch) -> {name: [B]}` over the batches (rendered once, then
        replayed); the rows of every process with their `weight`, index (`key`) and `task`
        (padding rows: weight 0, index -1)."""
        out: dict[str, list] = {}
        key = self.key
        for batch in self.batches:
            g = to_global(batch, self.mesh)
            vals = jax.device_get(self._gather({**fn(*args, g), "weight": g["weight"],
                                                key: g[key]}))  # fmt: skip
            for k, v in vals.items():
                out.setdefault(k, []).append(np.asarray(v, np.int64 if k == key else np.float64))
        rows = {k: np.concatenate(v) for k, v in out.items()}
        rows["task"] = np.where(rows[key] >= 0, self.tasks[np.maximum(rows[key], 0)], "")
        return rows


class PairPass(HeldOutPass):
    """A `HeldOutPass` over the pairs of preference files (`pair` the key); `records`:
    `open_pairs(files)` (pairs cut to identical rows left out), if already made."""

    def __init__(self, files: list[Path], template, loader, mesh, records=None) -> None:
        if records is None:
            records = open_pairs(files, template, loader.seq_len)[0]
        self.files, self.template, self.loader = files, template, loader
        super().__init__(records, loader, mesh, lambda pc, n: make_preference_eval_dataset(
            files, template, loader, process_index=jax.process_index(), process_count=pc,
            num_batches=n, records=records,
        ), "pair")  # fmt: skip


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
    tok_path, rows_per_example: int = 2,
) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """What the pair stages (reward, dpo) share after their setup: the loop from `start`,
    the held-out figures after it (of the weights handed on: with `train.keep_best` the best
    evaluation's), the loss plot and the summary (with the parameter figures). `evaluate`
    is `evaluate(state, model=None)`, `model` a `(graphdef, shardings)` other than the
    run's (a folded PEFT best/); `rows_per_example`: rows a batch has per example (tokens/s).
    Returns `(summary, last logged metrics)`."""
    eval_fn = (lambda s: scalar_figures(evaluate(s))) if evaluate else None
    meta = start_point.checkpoint_meta(cfg, tok_path)
    spec = loop_spec(
        cfg, step_fn, batches, mesh, eval_fn, meta, rows_per_example=rows_per_example,
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
