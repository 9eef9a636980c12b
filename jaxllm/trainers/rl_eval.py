"""Greedy before/after evaluation of an RL stage on held-out prompts, each asked once.

Besides the stage's own score (a rule, or the reward model the policy trains against) it
reports what that score cannot be trusted to: named rule rates (`polite`: the preference
data's own rule), degeneration (repeated word 3-grams, distinct-2, well-formed answers;
`text_metrics`) and, given the frozen reference, the exact KL of the policy's next-token
distributions to the reference's along its answers, summed per answer (0 before training).
A policy that games a reward model raises the score while these get worse.

Every process passes every held-out row and gets every figure (the answers come back from
`sample_all` on every process; the KL pass splits its rows over the mesh with `map_rows`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxllm.generation import Sampler, response_texts, sample_all
from jaxllm.sharding import use_rules
from jaxllm.trainers.rewards import Reward, arithmetic
from jaxllm.trainers.rollout import Rollouts, TextScores, layout_rollouts, policy_outputs
from jaxllm.trainers.text_metrics import answer_quality
from jaxllm.training.losses import token_kl

# all rows (rollout layout, host arrays on every process) -> KL per row over its answer
KLFn = Callable[[dict[str, np.ndarray]], np.ndarray]
SIDE_BY_SIDE = 4  # held-out prompts shown with their answers before and after


def make_kl_pass(graphdef, ref_graphdef, mesh, rules: str, temperature: float) -> Callable:
    """`kl(params, frozen, ref_state, batch) -> kl_B`, jitted once per shape: the exact
    KL(pi || ref) of softmax(logits / temperature) at every response position (the
    rollout layout's `mask`), summed per row."""

    @jax.jit
    def kl(params, frozen, ref_state, batch):
        with use_rules(mesh, rules):
            logits_BLV, _ = policy_outputs(nnx.merge(graphdef, params, frozen), batch)
            ref_logits_BLV, _ = policy_outputs(nnx.merge(ref_graphdef, ref_state), batch)
        return (token_kl(logits_BLV, ref_logits_BLV, temperature) * batch["mask"]).sum(axis=1)

    return kl


def greedy_eval(
    sampler: Sampler, weights: nnx.State, rows: list[dict], tok: Any, scores: TextScores,
    *, max_new_tokens: int, stop_ids: Sequence[int], batch_size: int = 32,
    rules: Mapping[str, Reward] | None = None, kl: KLFn | None = None, seq_len: int = 0,
    episodes: Callable[[list[dict]], Rollouts] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Greedy answers to held-out prompt rows: the mean of `scores(texts, rows)` (`reward`),
    exact-match `accuracy`, the mean of each rule in `rules` (by its name), `answer_quality`'s
    degeneration figures, with `kl` the mean KL per answer (`kl` gets the rows laid out as
    [N, seq_len] rollouts), a few `samples` and all `answers` (the same on every process).
    `episodes(rows)` (multi-turn, greedy, with an environment) replaces the one-turn answers;
    every process then plays every row."""
    prompts = [r["ids"] for r in rows]
    if episodes is None:
        res = sample_all(
            sampler, weights, prompts, batch_size=batch_size, key_for=lambda n: jax.random.key(0),
            max_new_tokens=max_new_tokens, stop_ids=stop_ids,
        )  # fmt: skip
        texts = response_texts(tok, res)
        length = seq_len or max(map(len, prompts)) + max_new_tokens
        layout = lambda: layout_rollouts(prompts, res, tok, length).batch  # noqa: E731
    else:
        ro = episodes(rows)
        texts, layout = ro.texts, lambda: ro.batch
    out: dict[str, Any] = {
        "reward": _mean(scores(texts, rows)),
        "accuracy": _mean(arithmetic(t, r) for t, r in zip(texts, rows)),
        **text_figures(texts, rows, rules or {}),
    }
    if kl is not None:
        out["kl"] = _mean(np.asarray(kl(layout())), digits=6)
    out["samples"] = [
        {"prompt": tok.decode(r["ids"]), "reference": r.get("answer"), "answer": t}
        for r, t in list(zip(rows, texts))[:6]
    ]
    out["answers"] = texts
    return out


def text_figures(
    texts: Sequence[str], rows: Sequence[dict], rules: Mapping[str, Reward]
) -> dict[str, float]:
    """The mean of each named rule over (answer, prompt row) pairs and `answer_quality`'s
    degeneration figures of the answers."""
    out = {name: _mean(rule(t, r) for t, r in zip(texts, rows)) for name, rule in rules.items()}
    return {**out, **answer_quality(texts)}


def side_by_side(
    rows: list[dict], before: list[str], after: list[str], n: int
) -> list[dict[str, str]]:
    """Up to `n` held-out prompts (evenly spaced) with the answer before and after."""
    if not rows or not before or not after:
        return []
    picks = np.unique(np.linspace(0, len(rows) - 1, min(n, len(rows))).astype(int))
    return [
        {"prompt": rows[i].get("prompt", ""), "before": before[i], "after": after[i]} for i in picks
    ]


def _mean(values, digits: int = 4) -> float:
    return round(float(np.mean(list(values))), digits)


_SHOWN = (  # (summary figure, label) for the console line under the side-by-side answers
    ("reward", "reward"), ("polite", "polite"), ("repeat_3gram", "repeated 3-grams"),
    ("distinct_2", "distinct-2"), ("distinct_answers", "distinct answers"),
    ("chosen_f1", "F1 to the best answer"), ("well_formed", "well-formed"), ("kl", "KL/answer"),
)  # fmt: skip


def comparison_lines(summary: dict[str, Any]) -> list[str]:
    """Console lines for an RL summary (or a pipeline's, by its last RL stage): the side-by-
    side answers to held-out prompts and the before → after figures; [] when it has none."""
    stages = [s["summary"] for s in summary.get("stages", [])] or [summary]
    rl = next((s for s in reversed(stages) if s.get("side_by_side")), None)
    if rl is None:
        return []
    lines = ["held-out prompts, greedy answers before → after RL:"]
    for row in rl["side_by_side"]:
        lines += [
            f"  {row['prompt']}",
            f"    before: {row['before']}",
            f"    after:  {row['after']}",
        ]
    figures = [
        f"{label} {rl[f'greedy_{key}_before']:.3g} → {rl[f'greedy_{key}_after']:.3g}"
        for key, label in _SHOWN
        if f"greedy_{key}_before" in rl
    ]
    return lines + ["  " + " · ".join(figures)]
