"""The RL machine PPO and GRPO share: setup (policy, frozen reference, prompts, the sampler
on the mesh, the jitted scoring pass), one iteration (`rl_iteration.py`: rollouts → scoring → the stage's
post-rollout math in one jitted function → epochs of minibatch steps), the resumable outer
loop, greedy evaluation and the summary. A stage plugs in an `Algorithm`.

Multi-process: every process picks the same prompts (the same seeded generator), samples
and decodes its own rows of them (`Sampler.my_rows`), scores its texts with the rule
rewards, and joins rows into global arrays; everything after that (advantages, statistics,
minibatch gathers, steps) runs on global arrays, and the host reads only replicated scalars.
The rollouts' texts are gathered once per iteration for the row's text figures (rule rates,
degeneration: `rl_eval.text_figures`), so every process reports all of them.

An iteration is `produce` (sampling + rewards) then `learn`; with `max_staleness` k >= 1 the
producing runs ahead in a background thread on weights up to k updates old (`rl_async.py`).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm.errors import ConfigError
from jaxllm.generation import Sampler
from jaxllm.rundir import atomic_write_text
from jaxllm.sharding.batch import map_rows, rows_to_global
from jaxllm.tokenizer.chat import ChatTemplate
from jaxllm.trainers.envs import get_env
from jaxllm.trainers.episodes import EpisodeRunner
from jaxllm.trainers.rewards import Reward, get_reward
from jaxllm.trainers.rl_eval import (
    SIDE_BY_SIDE,
    greedy_eval,
    make_kl_pass,
    side_by_side,
)
from jaxllm.trainers.rl_iteration import rl_iteration
from jaxllm.trainers.rollout import (
    TextScores,
    eval_rows,
    gap_stats,
    load_prompts,
    make_scoring_pass,
    stop_ids,
)
from jaxllm.training.preemption import Preempted, PreemptionWatch, defer, stop_message


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
    mesh: Mesh
    rules: str
    template: ChatTemplate
    tok: Any
    tok_path: str
    ref: tuple  # (graphdef, state) of the frozen reference
    rows: list[dict]  # training prompts
    val: list[dict]  # held-out prompts, each once (greedy before/after)
    sampler: Sampler
    score: Callable
    eval_rules: dict[str, Reward]  # rule rates beside the stage's own score
    episodes: EpisodeRunner | None = None  # multi-turn rollouts with `env` (None: one turn)


def setup_stage(cfg, section: str, total_steps: int, wrap=None) -> Stage:
    """Policy (from `inputs.checkpoint`, LoRA per `peft:`), frozen reference (the same
    checkpoint, LoRA merged), tokenizer, prompts, the sampler and the jitted scoring pass."""
    from jaxllm.sharding import make_mesh
    from jaxllm.trainers.lm import init_from_checkpoint, load_frozen_model, stage_tokenizer
    from jaxllm.training.optim import make_optimizer

    s, rules = getattr(cfg, section), cfg.mesh.rules
    if cfg.train.grad_accum != 1:  # the RL steps take one optimizer step per minibatch
        raise ConfigError(
            f"config key 'train.grad_accum': {section} takes one optimizer step per "
            f"minibatch; set grad_accum: 1 and a larger {section}.minibatch_size instead"
        )
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
    ref_graphdef, ref_state, *_ = load_frozen_model(  # QLoRA: the quantised base, as the policy's
        Path(start.checkpoint), mesh, rules, quantize=cfg.quantize
    )
    new_tokens = max(s.max_new_tokens, s.eval_max_new_tokens)  # rollouts and greedy answers
    fit = cfg.loader.seq_len - new_tokens
    if start.model.positions == "learned":
        fit = min(fit, start.model.max_seq_len - new_tokens)
    rows = load_prompts(s.prompt_file, f"{section}.prompt_file", template, s.task, fit)
    key = "prompts_per_iteration" if hasattr(s, "prompts_per_iteration") else "rollout_batch"
    if len(rows) < getattr(s, key):
        raise ConfigError(
            f"config key '{section}.{key}': {getattr(s, key)} distinct prompts per iteration, "
            f"but only {len(rows)} in {s.prompt_file} are left after the task filter and the "
            f"fit to {fit} prompt tokens"
        )
    val = []
    if s.val_file and s.eval_examples:
        val = load_prompts(s.val_file, f"{section}.val_file", template, s.task, fit)
        val = eval_rows(val, s.eval_examples)  # each held-out prompt once
    graphdef = start.graphdef
    score = make_scoring_pass(graphdef, ref_graphdef, mesh, rules, s.temperature)
    eval_rules = {name: get_reward(name, f"{section}.eval_rules") for name in s.eval_rules}
    sampler, episodes = Sampler(graphdef, mesh=mesh, rules=rules), None
    if getattr(s, "env", ""):  # grpo.env: multi-turn episodes
        episodes = EpisodeRunner(
            sampler, tok, get_env(s.env, f"{section}.env"), tuple(stop_ids(template)),
            cfg.loader.seq_len, s.max_turns,
        )  # fmt: skip
    return Stage(
        start, tx, mesh, rules, template, tok, str(tok_path), (ref_graphdef, ref_state), rows,
        val, sampler, score, eval_rules, episodes,
    )  # fmt: skip


@dataclass
class Algorithm:
    """What a stage plugs into the shared iteration.

    `pick(rng)`: the iteration's prompt rows (global: the same on every process).
    `rewards(texts, rows, batch)`: this process's decoded responses and prompt rows and the
    global rollout batch → per-row global arrays [B] (the rewards, any figures).
    `post(scores, batch, rewards)`: on device → (training fields [B, ...], scalar stats);
    built with `make_post`. `report(stats)`: the row's stage figures from the host stats."""

    step_fn: Callable
    pick: Callable[[np.random.Generator], list[dict]]
    rewards: Callable[[list[str], list[dict], dict], dict[str, jax.Array]]
    post: Callable[[dict, dict, dict], tuple[dict, dict]]
    report: Callable[[dict[str, float]], dict[str, float]]


def make_post(fn: Callable, mesh: Mesh) -> Callable:
    """`fn(scores, batch, rewards, *args) -> (fields, stats)` jitted, with the statistics
    every stage reports added: the sampler/learner log-prob gap, response tokens and the
    mean response length. The stats come back replicated (every host reads them)."""

    @functools.partial(jax.jit, out_shardings=(None, NamedSharding(mesh, PartitionSpec())))
    def post(scores, batch, rewards, *args):
        fields, stats = fn(scores, batch, rewards, *args)
        gap, gap_max = gap_stats(batch["sampler_logp"], scores["logp"], batch["mask"])
        tokens = jnp.sum(batch["mask"])
        return fields, {
            **stats, "logprob_gap": gap, "logprob_gap_max": gap_max, "tokens": tokens,
            "response_length": tokens / batch["mask"].shape[0],
        }  # fmt: skip

    return post


def local_scores(values: list[float], mesh: Mesh, rules: str) -> jax.Array:
    """Per-row host figures of this process's rows → one global f32 array."""
    return rows_to_global(np.asarray(values, np.float32), mesh, rules)


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
    preemption = PreemptionWatch()
    preempted = False
    try:
        preemption.install()
        for it in range(start + 1, s.iterations + 1):
            t0 = time.perf_counter()
            state, last = iteration(state, rng, it, clock)
            clock["wall"] = clock.get("wall", 0.0) + time.perf_counter() - t0
            preempted = preemption.reached(it)  # every process, every iteration
            writer.write(it, last)
            bar.update(1)
            bar.set_postfix(reward=f"{last['reward']:.3f}", kl=f"{last['kl']:.4f}")
            due = it == s.iterations or (s.checkpoint_every and it % s.checkpoint_every == 0)
            # asynchronous rollouts: the host RNG has already drawn for iterations ahead, so
            # only a segment's end is a state a rerun repeats exactly; keep the last one
            if due or (preempted and not s.max_staleness):
                meta = {  # copies: the save is async and the loop goes on
                    "iteration": it, "rng": rng.bit_generator.state, "clock": dict(clock),
                    "last": dict(last), "before": before,
                    "extra": extra.get_state() if extra is not None else {},
                }  # fmt: skip
                ckpt.save(it, state, meta)
                preempted = preempted or preemption.noticed()  # came during the save: stop
            if preempted and it < s.iterations:  # at the last: finish the stage
                ckpt.wait()
                kept = ckpt.latest_step()
                why = "; with max_staleness only a checkpoint_every iteration is exact to resume"
                if kept == it:
                    saved = f"state saved to {resume_path(run_dir)}/{it}"
                elif kept:
                    saved = f"the rerun goes on from {resume_path(run_dir)}/{kept}{why}"
                else:
                    saved = f"no checkpoint yet, the rerun starts over{why}"
                raise Preempted(stop_message(f"iteration {it}", saved))
        if preempted or preemption.noticed():  # at the last iteration: the stage finishes,
            defer()  # and the process starts no other loop
    finally:
        preemption.remove()
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
    """Final figures of an RL stage: the last iteration's metrics, greedy before/after
    (`greedy_<figure>_before/after`: score, accuracy, rule rates, degeneration, KL; a few
    answers side by side), the generate/train split, parameter counts, the loss plot and
    the outputs."""
    from jaxllm.trainers.lm import param_figures
    from jaxllm.training.metrics import plot_losses

    iterations = getattr(cfg, cfg.stage).iterations
    out: dict[str, Any] = {
        "iterations": iterations, "steps": steps, "resumed_from_iteration": resumed_from
    }  # fmt: skip
    out.update({f"final_{k}": round(v, 6) for k, v in last.items() if isinstance(v, float)})
    for key, value in before.items():
        if isinstance(value, float) and key in after:
            out[f"greedy_{key}_before"], out[f"greedy_{key}_after"] = value, after[key]
    if "samples" in before:
        out["samples_before"], out["samples_after"] = before["samples"], after["samples"]
    pairs = side_by_side(st.val, before.get("answers", []), after.get("answers", []), SIDE_BY_SIDE)
    if pairs:
        out["side_by_side"] = pairs
    every = side_by_side(st.val, before.get("answers", []), after.get("answers", []), len(st.val))
    answers_file = Path(run_dir) / "heldout_answers.jsonl"
    if every and jax.process_index() == 0:  # every held-out prompt, before and after
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in every)
        atomic_write_text(answers_file, text)
    out.update(timing(clock["gen"], clock["train"], clock["tokens"]))
    out["seconds_per_iteration"] = round(clock.get("wall", 0.0) / max(iterations, 1), 3)
    if "wait" in clock:  # asynchronous rollouts: the learner's wait for them
        out["rollout_wait_seconds"] = round(clock["wait"], 2)
    plot = plot_losses(Path(run_dir) / "metrics.jsonl", Path(run_dir) / "loss.png", cfg.name)
    out["loss_plot"] = plot.name if plot else None
    out["outputs"] = {"checkpoint": str(checkpoint_path(run_dir)), "tokenizer": st.tok_path}
    if every:
        out["outputs"]["heldout_answers"] = str(answers_file)
    return {**param_figures(st.start, Path(run_dir)), **out}


def timing(gen_s: float, train_s: float, tokens: int) -> dict[str, float]:
    """Share of the iterations spent generating vs training, and rollout tokens/s."""
    total = max(gen_s + train_s, 1e-9)
    return {
        "generate_seconds": round(gen_s, 2),
        "train_seconds": round(train_s, 2),
        "generate_share": round(gen_s / total, 4),
        "rollout_tokens_per_s": round(tokens / max(gen_s, 1e-9), 1),
    }


def run_steps(s, rollouts: int) -> int:
    """Optimizer steps of a whole run: iterations × epochs × minibatches per rollout batch."""
    return s.iterations * s.epochs * (rollouts // s.minibatch_size)


def make_evaluate(
    st: Stage, s, scores: TextScores, seq_len: int
) -> Callable[[Any], dict[str, Any]]:
    """`evaluate(state)`: greedy answers to the held-out prompts scored by `scores`, the
    stage's `eval_rules`, the degeneration measures and the exact KL to the frozen reference
    (`rl_eval.greedy_eval`; no figures without held-out prompts)."""
    kl_pass = make_kl_pass(st.start.graphdef, st.ref[0], st.mesh, st.rules, s.temperature)

    def evaluate(state) -> dict[str, Any]:
        if not st.val:
            return {}

        def kl(batch):
            fn = lambda b: kl_pass(state.params, state.frozen, st.ref[1], b)  # noqa: E731
            return map_rows(fn, batch, st.mesh, st.rules)

        weights = nnx.merge_state(state.params, state.frozen)
        episodes = None
        if st.episodes is not None:  # greedy episodes with the environment
            episodes = functools.partial(
                st.episodes, weights, max_new_tokens=s.eval_max_new_tokens,
                key=jax.random.key(0), temperature=0.0,
            )  # fmt: skip
        return greedy_eval(
            st.sampler, weights, st.val, st.tok, scores, max_new_tokens=s.eval_max_new_tokens,
            stop_ids=stop_ids(st.template), rules=st.eval_rules, kl=kl, seq_len=seq_len,
            episodes=episodes,
        )  # fmt: skip

    return evaluate


def run_rl(
    cfg, run_dir: Path, st: Stage, algo: Algorithm, scores: TextScores, steps: int,
    save: Callable[[Any, Path], None], extra: Resumable | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A whole RL stage after its setup: greedy figures before, the iterations (resumable),
    the final policy through `save(state, directory)`, greedy figures after, the summary
    (`steps`: the run's optimizer steps)."""
    s = getattr(cfg, cfg.stage)
    evaluate = make_evaluate(st, s, scores, cfg.loader.seq_len)
    pipe = None
    if s.max_staleness:  # rollouts from a background thread, up to k updates old
        from jaxllm.trainers.rl_async import async_iteration

        iteration, pipe = async_iteration(cfg, st, algo)
    else:

        def iteration(state, rng, it, clock):
            return rl_iteration(cfg, st, algo, state, rng, it, clock)

    try:
        state, last, before, clock, resumed = run_iterations(
            cfg, st, run_dir, iteration, evaluate, extra
        )
    finally:
        if pipe is not None:
            pipe.close()
    save(state, checkpoint_path(run_dir))
    after = evaluate(state)
    return rl_summary(cfg, st, run_dir, steps, last, before, after, clock, resumed)
