"""Batched rollouts for RL stages: prompts → sampled responses through the jitted KV-cache
`Sampler`, laid out as fixed-shape [B, L] arrays of prompt + response ready for one learner
forward pass, plus the pieces PPO and GRPO share (prompt loading, the jitted scoring pass,
the log-prob agreement check, greedy before/after evaluation, the final checkpoint).

Layout (right-padded, one sequence per row): `tokens_BL` = prompt + response, `targets_BL`
= tokens shifted left, `mask_BL` = 1 where the target is a response token (the stop token
included: the policy chose it), `sampler_logp_BL` = the sampler's log-prob of that target,
`segment_ids_BL` (1 real, 0 padding), `positions_BL` (0..n-1).

Temperature: rollouts sample from softmax(logits / T) (the section's `temperature`, > 0), and
every log-prob of a stage is taken on that distribution: the sampler's, the learner's old and
new ones (the PPO / GRPO ratio), the frozen reference's (the KL) and the entropy all divide
their logits by the same T (as TRL does), so the agreement check compares like with like.
T = 1 runs exactly the untempered programs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.data.preference import PromptRecords, prompt_rows
from jaxllm.errors import ConfigError, JaxllmError
from jaxllm.generation import Sampler
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
    records = PromptRecords([path])
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
    """Host arrays [B, L] (see the module docstring) and the decoded responses."""

    batch: dict[str, np.ndarray]
    texts: list[str]
    lengths: np.ndarray  # [B] response tokens


def sample_rollouts(
    sampler: Sampler, weights: nnx.State, prompts: Sequence[Sequence[int]], tok: Any,
    *, seq_len: int, max_new_tokens: int, key: jax.Array, temperature: float,
    stop_ids: Sequence[int],
) -> Rollouts:  # fmt: skip
    """Samples one response per prompt (one jitted prefill + one while_loop decode) and lays
    prompt + response out as fixed [B, seq_len] arrays."""
    res = sampler(
        weights, prompts, max_new_tokens=max_new_tokens, key=key,
        temperature=temperature, stop_ids=stop_ids,
    )  # fmt: skip
    b = len(prompts)
    tokens = np.zeros((b, seq_len), np.int32)
    seg = np.zeros((b, seq_len), np.int32)
    mask = np.zeros((b, seq_len), np.float32)
    slogp = np.zeros((b, seq_len), np.float32)
    texts = []
    for i, (p, r, lp, stopped) in enumerate(zip(prompts, res.tokens, res.logprobs, res.stopped)):
        n_p, n_r = len(p), len(r)
        if n_p + n_r > seq_len:
            raise ConfigError(f"prompt {n_p} + response {n_r} tokens exceed seq_len {seq_len}")
        tokens[i, : n_p + n_r] = list(p) + list(r)
        seg[i, : n_p + n_r] = 1
        mask[i, n_p - 1 : n_p + n_r - 1] = 1.0
        slogp[i, n_p - 1 : n_p + n_r - 1] = lp
        texts.append(tok.decode(r[:-1] if stopped else r))
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (b, seq_len)) * seg
    targets = np.concatenate([tokens[:, 1:], np.zeros((b, 1), np.int32)], axis=1)
    batch = dict(
        tokens=tokens, targets=targets, segment_ids=seg, positions=positions.astype(np.int32),
        mask=mask, sampler_logp=slogp,
    )  # fmt: skip
    return Rollouts(batch, texts, np.asarray(res.num_tokens, np.int32))


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


def logprob_gap(sampler_logp_BL, logp_BL, mask_BL, tol: float) -> tuple[float, float]:
    """(mean, max) |sampler − learner| log-prob over response tokens (both at the rollout
    temperature); raises `StaleRollout` when the mean is above `tol` (the rollout was sampled
    with other weights, or scored at another temperature, than the learner's).

    The mean decides: in f32 the KV-cache decode and the full forward round differently,
    typically 1e-6–1e-5 per token, but after long training single tokens reach ~1e-4 (logits
    grow) while the rest agree. Stale weights move every token's log-prob by 1e-3 or more,
    so even one stale row in a batch lifts the mean well above 1e-4."""
    diff = np.abs(np.asarray(sampler_logp_BL) - np.asarray(logp_BL)) * np.asarray(mask_BL)
    mean = float(diff.sum() / max(float(np.sum(mask_BL)), 1.0))
    worst = float(diff.max())
    if not (np.isfinite(mean) and np.isfinite(worst)) or mean > tol:
        raise StaleRollout(
            f"sampler and learner log-probs of the same tokens differ by {mean:.3g} on average "
            f"(max {worst:.3g}) > logprob_tol {tol:g}: rollouts were sampled with stale or "
            "different weights or at another temperature (or a low-precision model dtype; use "
            "float32 for RL)"
        )
    return mean, worst


def minibatches(n: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A shuffled split of range(n) into n / size index arrays."""
    perm = rng.permutation(n)
    return [perm[i : i + size] for i in range(0, n, size)]


def greedy_eval(
    sampler: Sampler, weights: nnx.State, rows: list[dict], tok: Any, reward: Callable,
    *, max_new_tokens: int, stop_ids: Sequence[int], batch_size: int = 32,
) -> dict[str, Any]:  # fmt: skip
    """Greedy answers to held-out prompts: mean `reward`, exact-match accuracy and samples.
    Batches are padded to one size so every call reuses one compiled program."""
    from jaxllm.trainers.rewards import arithmetic

    texts: list[str] = []
    size = min(batch_size, len(rows))
    for start in range(0, len(rows), size):
        chunk = [r["ids"] for r in rows[start : start + size]]
        res = sampler(
            weights, chunk + [chunk[-1]] * (size - len(chunk)), max_new_tokens=max_new_tokens,
            key=jax.random.key(0), stop_ids=stop_ids,
        )  # fmt: skip
        for toks, stopped in list(zip(res.tokens, res.stopped))[: len(chunk)]:
            texts.append(tok.decode(toks[:-1] if stopped else toks))
    rewards = [reward(t, r) for t, r in zip(texts, rows)]
    hits = [arithmetic(t, r) for t, r in zip(texts, rows)]
    samples = [
        {"prompt": tok.decode(r["ids"]), "reference": r.get("answer"), "answer": t}
        for r, t in list(zip(rows, texts))[:6]
    ]
    return {
        "reward": round(float(np.mean(rewards)), 4),
        "accuracy": round(float(np.mean(hits)), 4),
        "samples": samples,
    }


def eval_rows(rows: list[dict], n: int) -> list[dict]:
    """Up to `n` rows evenly spaced through the list."""
    picks = np.unique(np.linspace(0, len(rows) - 1, min(n, len(rows))).astype(int))
    return [rows[i] for i in picks]


def stop_ids(template: ChatTemplate) -> list[int]:
    return [template.ids["<|end|>"], template.ids["</s>"]]


def timing(gen_s: float, train_s: float, tokens: int) -> dict[str, float]:
    """Share of the iterations spent generating vs training, and rollout tokens/s."""
    total = max(gen_s + train_s, 1e-9)
    return {
        "generate_seconds": round(gen_s, 2),
        "train_seconds": round(train_s, 2),
        "generate_share": round(gen_s / total, 4),
        "rollout_tokens_per_s": round(tokens / max(gen_s, 1e-9), 1),
    }


def to_device(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in batch.items()}


def checkpoint_path(run_dir: Path) -> Path:
    """The final policy (a plain decoder checkpoint, what later stages load)."""
    return Path(run_dir) / "checkpoints"


def resume_path(run_dir: Path) -> Path:
    """The iteration checkpoints a killed run resumes from (the whole train state)."""
    return Path(run_dir) / "resume"


@dataclass
class Stage:
    """What PPO and GRPO both build before their first iteration."""

    start: Any  # lm.StartPoint of the policy
    tx: Any
    mesh: Any
    template: ChatTemplate
    tok: Any
    tok_path: str
    ref: tuple  # (graphdef, state) of the frozen reference
    rows: list[dict]  # training prompts
    val: list[dict]  # held-out prompts (greedy before/after)
    sampler: Sampler
    score: Callable


def setup_stage(cfg, section: str, total_steps: int, wrap=None) -> Stage:
    """Policy (from `inputs.checkpoint`, LoRA per `peft:`), frozen reference (the same
    checkpoint, LoRA merged), tokenizer, prompts, the sampler and the jitted scoring pass."""
    from jaxllm.sharding import make_mesh
    from jaxllm.trainers.lm import init_from_checkpoint, load_frozen_model, stage_tokenizer
    from jaxllm.training.optim import make_optimizer

    s = getattr(cfg, section)
    mesh = make_mesh(cfg.mesh)
    tx = make_optimizer(cfg.train.optim, total_steps)
    shards = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    if s.minibatch_size % shards:
        raise ConfigError(
            f"config key '{section}.minibatch_size': {s.minibatch_size} rows do not split over "
            f"the {shards} data-parallel devices of the mesh"
        )
    start = init_from_checkpoint(cfg, tx, mesh, wrap=wrap)
    if start.model.dtype != "float32":
        raise ConfigError(
            f"inputs.checkpoint: model dtype {start.model.dtype}; {section} needs float32 so "
            "sampler and learner log-probs agree"
        )
    tok, tok_path = stage_tokenizer(cfg, start.meta, start.model)
    template = ChatTemplate(tok)
    ref_graphdef, ref_state, *_ = load_frozen_model(Path(start.checkpoint), mesh, cfg.mesh.rules)
    fit = cfg.loader.seq_len - s.max_new_tokens
    if start.model.positions == "learned":
        fit = min(fit, start.model.max_seq_len - s.max_new_tokens)
    rows = load_prompts(s.prompt_file, f"{section}.prompt_file", template, s.task, fit)
    val = []
    if s.val_file and s.eval_examples:
        val = load_prompts(s.val_file, f"{section}.val_file", template, s.task, fit)
        val = eval_rows(val, s.eval_examples)
    graphdef = start.graphdef
    score = make_scoring_pass(graphdef, ref_graphdef, mesh, cfg.mesh.rules, s.temperature)
    return Stage(
        start, tx, mesh, template, tok, str(tok_path), (ref_graphdef, ref_state), rows, val,
        Sampler(graphdef), score,
    )  # fmt: skip


class Resumable(Protocol):
    """Host-side state of a stage that must survive a restart (PPO's KL controller)."""

    def get_state(self) -> dict[str, Any]: ...

    def set_state(self, state: dict[str, Any]) -> None: ...


def run_iterations(
    cfg, st: Stage, run_dir: Path, iteration: Callable, evaluate: Callable,
    extra: Resumable | None = None,
) -> tuple[Any, dict[str, Any], dict[str, Any], dict[str, float], int]:  # fmt: skip
    """The RL outer loop (over iterations, never tokens): `iteration(state, rng, it, clock)
    -> (state, metrics row)`, one row per iteration to metrics.jsonl, a progress bar with the
    reward and KL. `evaluate(state)` gives the greedy figures before the first iteration.

    Every `checkpoint_every` iterations and after the last, the train state goes to
    `resume/<iteration>` with the minibatch RNG, the clock, the last row, the `before`
    figures and `extra`'s state in its metadata; a killed run started again continues from
    the newest one and repeats the uninterrupted run's metrics exactly (rollout keys are
    `fold_in(seed, iteration)`). Returns `(state, last row, before, clock, resumed_from)`;
    the clock holds generate / train seconds and rollout tokens for `timing`, resumed_from
    the iteration the run restarted after (0: a fresh run)."""
    from tqdm import tqdm

    from jaxllm.trainers.lm import restore_latest
    from jaxllm.training.checkpoint import Checkpointer
    from jaxllm.training.metrics import MetricsWriter

    s = getattr(cfg, cfg.stage)
    ckpt = Checkpointer(resume_path(run_dir), cfg.train.keep_checkpoints)
    state, start, last = st.start.state, 0, {}
    rng = np.random.default_rng(cfg.seed)
    clock: dict[str, float] = {"gen": 0.0, "train": 0.0, "tokens": 0}
    found = restore_latest(ckpt, state, st.start.shardings)
    if found is None:
        before = evaluate(state)
    else:
        state, start, meta = found
        rng.bit_generator.state = meta["rng"]
        clock, last, before = meta["clock"], meta["last"], meta["before"]
        if extra is not None:
            extra.set_state(meta["extra"])
    writer = MetricsWriter(Path(run_dir), resume_step=start)
    bar = tqdm(total=s.iterations, initial=start, desc=f"{cfg.stage} {cfg.name}",
               disable=not cfg.progress)  # fmt: skip
    try:
        for it in range(start + 1, s.iterations + 1):
            state, last = iteration(state, rng, it, clock)
            writer.write(it, last)
            bar.update(1)
            bar.set_postfix(reward=f"{last['reward']:.3f}", kl=f"{last['kl']:.4f}")
            if it == s.iterations or (s.checkpoint_every and it % s.checkpoint_every == 0):
                meta = {  # copies: the save is async and the loop goes on
                    "iteration": it, "rng": rng.bit_generator.state, "clock": dict(clock),
                    "last": dict(last), "before": before,
                    "extra": extra.get_state() if extra is not None else {},
                }  # fmt: skip
                ckpt.save(it, state, meta)
    finally:
        bar.close()
        writer.close()
        ckpt.close()
    return state, last, before, clock, start


def write_final(directory: Path, keep: int, state: Any, meta: dict[str, Any]) -> None:
    """Saves the stage's final policy checkpoint at its optimizer step, synchronously; a
    restarted run that finds it already written (killed before its summary) keeps it."""
    from jaxllm.training.checkpoint import Checkpointer

    ckpt = Checkpointer(directory, keep, async_save=False)
    if ckpt.latest_step() != int(state.step):
        ckpt.save(int(state.step), state, meta)
    ckpt.close()


def rl_summary(
    cfg, st: Stage, run_dir: Path, steps: int, last, before, after, clock, resumed_from: int
) -> dict:
    """Final figures of an RL stage: the last iteration's metrics, greedy before/after, the
    generate/train split, parameter counts, the loss plot and the outputs."""
    from jaxllm.trainers.lm import param_figures
    from jaxllm.training.metrics import plot_losses

    iterations = getattr(cfg, cfg.stage).iterations
    out: dict[str, Any] = {
        "iterations": iterations, "steps": steps, "resumed_from_iteration": resumed_from
    }  # fmt: skip
    out.update({f"final_{k}": round(v, 6) for k, v in last.items() if isinstance(v, float)})
    for key in ("reward", "accuracy"):
        if key in before:
            out[f"greedy_{key}_before"] = before[key]
            out[f"greedy_{key}_after"] = after[key]
    if "samples" in before:
        out["samples_before"], out["samples_after"] = before["samples"], after["samples"]
    out.update(timing(clock["gen"], clock["train"], clock["tokens"]))
    plot = plot_losses(Path(run_dir) / "metrics.jsonl", Path(run_dir) / "loss.png", cfg.name)
    out["loss_plot"] = plot.name if plot else None
    out["outputs"] = {"checkpoint": str(checkpoint_path(run_dir)), "tokenizer": st.tok_path}
    return {**param_figures(st.start, Path(run_dir)), **out}
