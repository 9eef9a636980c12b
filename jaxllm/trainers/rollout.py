"""Batched rollouts for RL stages: prompts → sampled responses through the jitted KV-cache
`Sampler`, laid out as fixed-shape [B, L] arrays of prompt + response ready for one learner
forward pass; the jitted scoring pass and the log-prob agreement check (`rl_eval` scores
held-out prompts).

Layout (right-padded, one sequence per row): `tokens_BL` = prompt + response, `targets_BL`
= tokens shifted left, `mask_BL` = 1 where the target is a response token (the stop token
included: the policy chose it), `sampler_logp_BL` = the sampler's log-prob of that target,
`segment_ids_BL` (1 real, 0 padding), `positions_BL` (0..n-1). Each process lays out its
own rows (it decodes their texts for the rule rewards) and they join into global arrays.

Temperature: rollouts sample from softmax(logits / T) (the section's `temperature`, > 0), and
every log-prob of a stage is taken on that distribution: the sampler's, the learner's old and
new ones (the PPO / GRPO ratio), the frozen reference's (the KL) and the entropy all divide
their logits by the same T (as TRL does), so the agreement check compares like with like.
T = 1 runs exactly the untempered programs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm.data.preference import PromptRecords, prompt_rows
from jaxllm.errors import ConfigError, JaxllmError
from jaxllm.generation import Sampler, SampleResult, response_texts
from jaxllm.sharding import use_rules
from jaxllm.tokenizer.chat import ChatTemplate
from jaxllm.training.losses import token_entropy, token_logprobs


class StaleRollout(JaxllmError):
    """Sampler and learner log-probs of the same tokens disagree."""


def load_prompts(
    value: str, key: str, template: ChatTemplate, task: str, max_prompt_len: int
) -> list[dict[str, Any]]:
    """Prompt rows (`ids`, `answer`, `task`) of a JSONL file; an SFT record's `response` is
    its answer when it has no `answer`. Keeps `task` only (if set) and prompts that fit."""
    from jaxllm.trainers import data_file

    path = data_file(value, key)
    records = PromptRecords([path], key)  # refuses a file without records
    rows = prompt_rows(records, template)
    for i, row in enumerate(rows):
        if row.get("answer") is None:
            resp = records.source[i].get("response")
            row["answer"] = resp if isinstance(resp, str) else None
    rows = [r for r in rows if (not task or r["task"] == task) and len(r["ids"]) <= max_prompt_len]
    if not rows:
        raise ConfigError(
            f"config key '{key}': no prompt of task '{task or 'any'}' fits in "
            f"{max_prompt_len} tokens in {path}"
        )
    return rows


@dataclass
class Rollouts:
    """This process's rows: host arrays [B, L] (see the module docstring), the decoded
    responses and the response lengths [B]."""

    batch: dict[str, np.ndarray]
    texts: list[str]
    lengths: np.ndarray


def sample_rollouts(
    sampler: Sampler, weights: nnx.State, prompts: Sequence[Sequence[int]], tok: Any,
    *, seq_len: int, max_new_tokens: int, key: jax.Array, temperature: float,
    stop_ids: Sequence[int],
) -> Rollouts:  # fmt: skip
    """Samples one response per prompt of this process (one jitted prefill + one
    while_loop decode over the global batch) and lays its rows out as [B, seq_len]."""
    res = sampler(
        weights, prompts, max_new_tokens=max_new_tokens, key=key,
        temperature=temperature, stop_ids=stop_ids,
    )  # fmt: skip
    return layout_rollouts(prompts, res, tok, seq_len)


def layout_rollouts(
    prompts: Sequence[Sequence[int]], res: SampleResult, tok: Any, seq_len: int
) -> Rollouts:
    """Prompts + the sampler's responses as fixed [B, seq_len] host arrays (the module
    docstring's layout) and the decoded responses (stop token dropped)."""
    b = len(prompts)
    tokens = np.zeros((b, seq_len), np.int32)
    seg = np.zeros((b, seq_len), np.int32)
    mask = np.zeros((b, seq_len), np.float32)
    slogp = np.zeros((b, seq_len), np.float32)
    for i, (p, r, lp) in enumerate(zip(prompts, res.tokens, res.logprobs)):
        n_p, n_r = len(p), len(r)
        if n_p + n_r > seq_len:
            raise ConfigError(f"prompt {n_p} + response {n_r} tokens exceed seq_len {seq_len}")
        tokens[i, : n_p + n_r] = list(p) + list(r)
        seg[i, : n_p + n_r] = 1
        mask[i, n_p - 1 : n_p + n_r - 1] = 1.0
        slogp[i, n_p - 1 : n_p + n_r - 1] = lp
    batch = rollout_arrays(tokens, seg, mask, slogp)
    return Rollouts(batch, response_texts(tok, res), np.asarray(res.num_tokens, np.int32))


def rollout_arrays(
    tokens: np.ndarray, seg: np.ndarray, mask: np.ndarray, sampler_logp: np.ndarray
) -> dict[str, np.ndarray]:
    """The layout's dict from right-padded rows [B, L]: targets (tokens shifted left) and
    positions (0..n-1 on real tokens) added."""
    b, length = tokens.shape
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)) * seg
    targets = np.concatenate([tokens[:, 1:], np.zeros((b, 1), np.int32)], axis=1)
    return dict(
        tokens=tokens, targets=targets, segment_ids=seg, positions=positions.astype(np.int32),
        mask=mask, sampler_logp=sampler_logp,
    )  # fmt: skip


def policy_outputs(model, batch: dict, key: jax.Array | None = None):
    """(logits_BLV, values_BL or None) of a decoder or an actor-critic on a rollout batch."""
    out = model(
        batch["tokens"], positions_BL=batch["positions"], segment_ids_BL=batch["segment_ids"],
        deterministic=key is None, key=key,
    )  # fmt: skip
    return out if isinstance(out, tuple) else (out, None)


def make_scoring_pass(
    graphdef, ref_graphdef, mesh, rules: str, temperature: float = 1.0
) -> Callable:
    """`score(params, frozen, ref_state, batch) -> {logp, ref_logp, entropy[, values]}` [B, L],
    jitted once: the learner's log-probs of the sampled tokens (the PPO/GRPO "old" policy),
    the frozen reference's (passed as an argument, never trained) and the critic's values.
    Log-probs and entropy are those of softmax(logits / temperature), the rollouts' sampling
    temperature, for the policy and the reference alike."""

    @jax.jit
    def score(params, frozen, ref_state, batch):
        with use_rules(mesh, rules):
            logits_BLV, values_BL = policy_outputs(nnx.merge(graphdef, params, frozen), batch)
            ref_logits_BLV, _ = policy_outputs(nnx.merge(ref_graphdef, ref_state), batch)
        out = {
            "logp": token_logprobs(logits_BLV, batch["targets"], temperature),
            "ref_logp": token_logprobs(ref_logits_BLV, batch["targets"], temperature),
            "entropy": token_entropy(logits_BLV, temperature),
        }
        if values_BL is not None:
            out["values"] = values_BL
        return out

    return score


def make_gap_pass(graphdef, mesh, rules: str, temperature: float = 1.0) -> Callable:
    """`gap(params, frozen, batch) -> (mean, max)` |sampler − learner| log-prob of the
    response tokens, replicated, jitted once: the agreement check for rollouts sampled with
    other weights than the learner's current ones (asynchronous rollouts check the learner
    at the very weights that sampled them). The policy's forward only, at `temperature`."""

    @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, PartitionSpec()))
    def gap(params, frozen, batch):
        with use_rules(mesh, rules):
            logits_BLV, _ = policy_outputs(nnx.merge(graphdef, params, frozen), batch)
        logp_BL = token_logprobs(logits_BLV, batch["targets"], temperature)
        return gap_stats(batch["sampler_logp"], logp_BL, batch["mask"])

    return gap


def gap_stats(sampler_logp_BL, logp_BL, mask_BL) -> tuple[jax.Array, jax.Array]:
    """(mean, max) |sampler − learner| log-prob over the response tokens (f32, jit-able)."""
    mask_BL = jnp.asarray(mask_BL, jnp.float32)
    diff_BL = jnp.abs(jnp.asarray(sampler_logp_BL) - jnp.asarray(logp_BL)) * mask_BL
    return jnp.sum(diff_BL) / jnp.maximum(jnp.sum(mask_BL), 1.0), jnp.max(diff_BL)


def check_gap(mean: float, worst: float, tol: float) -> tuple[float, float]:
    """Raises `StaleRollout` when the mean gap is above `tol` (the rollout was sampled with
    other weights, or scored at another temperature, than the learner's).

    The mean decides: in f32 the KV-cache decode and the full forward round differently,
    typically 1e-6–1e-5 per token, but after long training single tokens reach ~1e-4 (logits
    grow) while the rest agree. Stale weights move every token's log-prob by 1e-3 or more,
    so even one stale row in a batch lifts the mean well above 1e-4."""
    mean, worst = float(mean), float(worst)
    if not (np.isfinite(mean) and np.isfinite(worst)) or mean > tol:
        raise StaleRollout(
            f"sampler and learner log-probs of the same tokens differ by {mean:.3g} on average "
            f"(max {worst:.3g}) > logprob_tol {tol:g}: rollouts were sampled with stale or "
            "different weights or at another temperature (or a low-precision model dtype; use "
            "float32 for RL)"
        )
    return mean, worst


def logprob_gap(sampler_logp_BL, logp_BL, mask_BL, tol: float) -> tuple[float, float]:
    """`gap_stats` checked against `tol` (see `check_gap`): (mean, max)."""
    return check_gap(*gap_stats(sampler_logp_BL, logp_BL, mask_BL), tol)


def minibatches(n: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A shuffled split of range(n) into n / size index arrays."""
    perm = rng.permutation(n)
    return [perm[i : i + size] for i in range(0, n, size)]


TextScores = Callable[[list[str], list[dict]], np.ndarray]


def rule_scores(reward: Callable[[str, dict], float]) -> TextScores:
    """A per-text rule reward as a `TextScores` (the texts' scores as float64)."""
    return lambda texts, rows: np.array([reward(t, r) for t, r in zip(texts, rows)], np.float64)


def eval_rows(rows: list[dict], n: int) -> list[dict]:
    """Up to `n` rows evenly spaced through the list, each prompt once (a ranking set holds
    a prompt several times, with other answers; its greedy answer is the same each time)."""
    first: dict[tuple, dict] = {}
    for r in rows:
        first.setdefault(tuple(r["ids"]), r)
    unique = list(first.values())
    picks = np.unique(np.linspace(0, len(unique) - 1, min(n, len(unique))).astype(int))
    return [unique[i] for i in picks]


def stop_ids(template: ChatTemplate) -> list[int]:
    return [template.ids["<|end|>"], template.ids["</s>"]]
