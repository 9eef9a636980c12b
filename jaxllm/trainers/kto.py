"""KTO inside `stage: dpo` (`dpo.loss: kto`): training on answers marked good or bad.

The train file holds unpaired feedback (`{"prompt", "completion", "label"}`, TRL's format),
pairs or rankings, mixed freely (`data/feedback.py`: a pair is two examples, the better
answer desirable). A batch is `loader.batch_size` examples, one row each, shuffled across
records. Every batch also carries mismatched rows (`add_mismatched_rows`): each prompt with
the next example's answer. Policy and reference score them; their mean log-ratio, clamped
at 0, is KTO's reference point z (`training/rl_losses.kto_loss`).

Held-out figures: a val file of pairs only gets the pair figures every `dpo.loss` reports
(`dpo._evaluator`: margins and pair accuracies of the implicit reward); one with unpaired
records gets `evaluator`'s: how well the implicit reward beta (pi - ref) separates the
desirable answers from the undesirable ones (`reward_auc`, a tie half), the same for the
policy's mean per-token log-prob (`avg_logp_auc`, meaningful before training too), and each
label's mean reward and log-prob.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import Config
from jaxllm.config.alignment import DPOConfig
from jaxllm.data.feedback import (
    FeedbackRecords,
    make_feedback_dataset,
    make_feedback_eval_dataset,
    open_examples,
)
from jaxllm.data.preference import PAIR_KEYS
from jaxllm.errors import ConfigError
from jaxllm.sharding import use_rules
from jaxllm.trainers import data_file
from jaxllm.trainers.pairs import HeldOutPass, row_logprobs, wmean
from jaxllm.training.rl_losses import kto_loss
from jaxllm.training.state import TrainState


def add_mismatched_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch plus `kl_<key>` [B, L] for each of `PAIR_KEYS`: row i is example i's prompt
    followed by the answer of the next real example of the batch (cyclically; padding rows,
    weight 0, stay zero), as TRL pairs each prompt with the next example's answer. Built on
    the host from the rows themselves: the prompt is a row's tokens up to its first answer
    target, the answer its masked targets (an answer cut in its own row stays cut); the new
    row is cut to L like any other."""
    tokens, targets, mask = batch["tokens"], batch["targets"], batch["loss_mask"]
    L = tokens.shape[-1]
    out = {f"kl_{k}": np.zeros_like(np.asarray(batch[k])) for k in PAIR_KEYS}
    real = np.flatnonzero(np.asarray(batch["weight"]) > 0)
    for n, i in enumerate(real):
        j = real[(n + 1) % len(real)]
        first = np.flatnonzero(mask[i])[0]  # targets from here on are the answer's
        seq = np.concatenate([tokens[i, : first + 1], targets[j][mask[j] > 0]])
        size = min(len(seq) - 1, L)
        out["kl_tokens"][i, :size] = seq[:size]
        out["kl_targets"][i, :size] = seq[1 : size + 1]
        out["kl_loss_mask"][i, first:size] = 1
        out["kl_segment_ids"][i, :size] = 1
        out["kl_positions"][i, :size] = np.arange(size)
    return {**batch, **out}


def mismatched(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The `kl_*` rows of `add_mismatched_rows` under the row keys."""
    return {k: batch[f"kl_{k}"] for k in PAIR_KEYS}


def make_kto_loss(d: DPOConfig, ref_graphdef: nnx.GraphDef):
    """`loss_fn(model, batch, key, consts)`, `consts = {"ref": reference state}`: KTO of the
    batch's examples, the mismatched rows scored without gradient or dropout."""

    def loss_fn(model, batch, key, consts):
        rows = {k: batch[k] for k in PAIR_KEYS}
        pi_B = row_logprobs(model, rows, None if d.disable_dropout else key)
        pi_kl_B = jax.lax.stop_gradient(row_logprobs(model, mismatched(batch)))
        ref = nnx.merge(ref_graphdef, consts["ref"])
        ref_B, ref_kl_B = row_logprobs(ref, rows), row_logprobs(ref, mismatched(batch))
        return kto_loss(pi_B, ref_B, batch["label"], pi_kl_B, ref_kl_B, d.beta,
                        d.desirable_weight, d.undesirable_weight, batch["weight"])  # fmt: skip

    return loss_fn


def _open(file, template, seq_len: int, key: str) -> tuple[FeedbackRecords, dict[str, int]]:
    """`open_examples` of one file, its cut examples said (process 0)."""
    records, fit = open_examples([file], template, seq_len, key)
    if fit["cut"] and jax.process_index() == 0:
        print(f"kto: {fit['cut']} of {fit['examples']} examples in {file} are longer than "
              f"loader.seq_len {seq_len} and cut (an answer's end lost); "
              f"{fit['without_answer']} of them before any answer token, left out")  # fmt: skip
    return records, fit


def check_batch(cfg: Config) -> None:
    """KTO's mismatched rows need two examples a batch in each process."""
    if cfg.loader.batch_size // jax.process_count() < 2:
        raise ConfigError(
            "config key 'loader.batch_size': KTO pairs each prompt with another example's "
            "answer in the batch; it needs at least 2 examples per process"
        )


def train_batches(cfg: Config, template) -> tuple[Any, dict[str, Any]]:
    """(this process's training batches with their mismatched rows, {"train_fit": counts})."""
    pc = jax.process_count()
    file = data_file(cfg.dpo.train_file, "dpo.train_file")
    records, fit = _open(file, template, cfg.loader.seq_len, "dpo.train_file")
    ds = make_feedback_dataset(records, template, cfg.loader, seed=cfg.seed,
                               process_index=jax.process_index(), process_count=pc)  # fmt: skip
    return ds.map(add_mismatched_rows), {"train_fit": fit, "kto_balance": balance(cfg, records)}


def balance(cfg: Config, records: FeedbackRecords) -> float:
    """lambda_D n_D / (lambda_U n_U) over the (weighted) training examples; said when outside
    [1, 4/3], the range the KTO paper recommends (TRL warns likewise)."""
    d, w = cfg.dpo, records.weights.astype(np.float64)
    n_d, n_u = float(np.sum(w[records.labels])), float(np.sum(w[~records.labels]))
    ratio = round(d.desirable_weight * n_d / max(d.undesirable_weight * n_u, 1e-9), 3)
    if not 1.0 <= ratio <= 4 / 3 and jax.process_index() == 0:
        need = d.undesirable_weight * n_u / max(n_d, 1e-9)  # the desirable_weight of ratio 1
        print(f"kto: desirable_weight x desirable / (undesirable_weight x undesirable) = {ratio} "
              f"({n_d:g} vs {n_u:g} weighted examples); the KTO paper keeps it in [1, 4/3]: "
              f"dpo.desirable_weight {need:.3g} to {4 * need / 3:.3g}")  # fmt: skip
    return ratio


def unpaired_val(cfg: Config) -> bool:
    """Whether `dpo.val_file` holds unpaired records (then `evaluator` scores it)."""
    if not cfg.dpo.val_file:
        return False
    return FeedbackRecords([data_file(cfg.dpo.val_file, "dpo.val_file")], "dpo.val_file").unpaired


def weighted_auc(score: np.ndarray, label: np.ndarray, weight: np.ndarray) -> float | None:
    """The weighted probability that a desirable row (label 1) scores above an undesirable
    one, a tie half (Mann-Whitney); None without rows of both labels. O(n log n)."""
    good, bad = (label > 0) & (weight > 0), (label <= 0) & (weight > 0)
    if not good.any() or not bad.any():
        return None
    order = np.argsort(score[bad], kind="stable")
    s_bad, cum = score[bad][order], np.concatenate([[0.0], np.cumsum(weight[bad][order])])
    lo = np.searchsorted(s_bad, score[good], "left")
    hi = np.searchsorted(s_bad, score[good], "right")
    wins = cum[lo] + 0.5 * (cum[hi] - cum[lo])
    return round(float(np.sum(weight[good] * wins) / (weight[good].sum() * cum[-1])), 4)


def evaluator(cfg: Config, graphdef, shardings, ref, mesh, template, fits: dict):
    """`evaluate(state, model=None) -> figures` on an unpaired `dpo.val_file` (its counts
    into `fits["val_fit"]`); the reference's log-probs are computed here, once."""
    file = data_file(cfg.dpo.val_file, "dpo.val_file")
    records, fits["val_fit"] = _open(file, template, cfg.loader.seq_len, "dpo.val_file")
    held_out = HeldOutPass(records, cfg.loader, mesh, lambda pc, n: make_feedback_eval_dataset(
        records, template, cfg.loader, process_index=jax.process_index(), process_count=pc,
        num_batches=n), "example")  # fmt: skip

    def score(model, batch):
        rows = {k: batch[k] for k in PAIR_KEYS}
        return {"logp": row_logprobs(model, rows), "label": batch["label"],
                "n": jnp.sum(batch["loss_mask"], axis=1)}  # fmt: skip

    def scorer(graphdef, shardings):
        @partial(jax.jit, in_shardings=(shardings, None))
        def fn(state: TrainState, batch):
            with use_rules(mesh, cfg.mesh.rules):
                return score(nnx.merge(graphdef, state.params, state.frozen), batch)

        return fn

    ref_graphdef, ref_state, ref_shardings = ref

    @partial(jax.jit, in_shardings=(ref_shardings, None))
    def ref_fn(ref_state, batch):
        with use_rules(mesh, cfg.mesh.rules):
            return score(nnx.merge(ref_graphdef, ref_state), batch)

    ref_rows = held_out.collect(ref_fn, ref_state)
    ref_table = np.zeros(held_out.size)
    real = ref_rows["example"] >= 0
    ref_table[ref_rows["example"][real]] = ref_rows["logp"][real]
    own = scorer(graphdef, shardings)

    def evaluate(state: TrainState, model=None) -> dict[str, Any]:
        """`model`: another (graphdef, shardings) for `state` (a folded best/)."""
        p = held_out.collect(own if model is None else scorer(*model), state)
        w = (p["weight"] > 0).astype(np.float64)  # every held-out example counts once
        reward = cfg.dpo.beta * (p["logp"] - ref_table[np.maximum(p["example"], 0)])
        avg = p["logp"] / np.maximum(p["n"], 1)
        good, bad = w * (p["label"] > 0), w * (p["label"] <= 0)
        return {
            "reward_auc": weighted_auc(reward, p["label"], w),
            "avg_logp_auc": weighted_auc(avg, p["label"], w),
            "reward_desirable": wmean(reward, good),
            "reward_undesirable": wmean(reward, bad),
            "logp_desirable": wmean(p["logp"], good),
            "logp_undesirable": wmean(p["logp"], bad),
            "examples": int(np.sum(w)),
        }

    return evaluate
