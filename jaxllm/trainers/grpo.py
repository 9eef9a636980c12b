"""`stage: grpo` — group-relative policy optimisation with rule rewards.

Each iteration samples `group_size` completions for each of `prompts_per_iteration` prompts
with the jitted KV-cache sampler on the current weights, scores them with the weighted rule
rewards, scores the tokens once (learner + frozen reference log-probs, one jitted pass; the
learner's must match the sampler's), turns rewards into group advantages and runs `epochs`
passes of minibatch steps of `grpo_loss` through the generic `make_train_step`.
All log-probs (sampler, old and new policy, reference: the ratio and the KL) and the entropy
are those of softmax(logits / grpo.temperature), the distribution the completions were
sampled from. The KL estimator is k3 or k2: k1's gradient is zero in expectation when the
KL is a loss term (config validation rejects it).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import Config
from jaxllm.rundir import RunDir
from jaxllm.trainers.advantages import group_advantages
from jaxllm.trainers.rewards import arithmetic, weighted_reward
from jaxllm.trainers.rollout import (
    checkpoint_path,
    greedy_eval,
    logprob_gap,
    minibatches,
    policy_outputs,
    rl_summary,
    run_iterations,
    sample_rollouts,
    setup_stage,
    stop_ids,
    write_final,
)
from jaxllm.training.losses import token_logprobs
from jaxllm.training.optim import lr_schedule
from jaxllm.training.rl_losses import grpo_loss
from jaxllm.training.state import to_global
from jaxllm.training.step import make_train_step


def grpo_loss_fn(clip_eps: float, beta: float, kl_kind: str, temperature: float = 1.0):
    """`loss_fn(model, batch, key)` on rollout minibatches (old_logp, ref_logp, adv [B]);
    the policy log-probs are of softmax(logits / temperature), the sampling temperature."""

    def loss_fn(model, batch, key):
        logits_BLV, _ = policy_outputs(model, batch)  # no dropout: ratios start at 1
        logp_BL = token_logprobs(logits_BLV, batch["targets"], temperature)
        return grpo_loss(
            logp_BL, batch["old_logp"], batch["ref_logp"], batch["adv"], batch["mask"],
            clip_eps, beta, kl_kind,
        )  # fmt: skip

    return loss_fn


def run(cfg: Config, run_dir: RunDir) -> dict[str, Any]:
    g, t = cfg.grpo, cfg.train
    n = g.prompts_per_iteration * g.group_size
    steps_per_iter = g.epochs * (n // g.minibatch_size)
    total = g.iterations * steps_per_iter
    st = setup_stage(cfg, "grpo", total)
    reward = weighted_reward(g.rewards, g.reward_weights)
    sp, mesh, rules = st.start, st.mesh, cfg.mesh.rules
    step_fn = make_train_step(
        sp.graphdef, grpo_loss_fn(g.clip_eps, g.beta, g.kl_estimator, g.temperature), st.tx,
        lr_schedule(t.optim, total), sp.shardings, mesh, rules,
    )  # fmt: skip
    stops = stop_ids(st.template)

    def evaluate(state):
        if not st.val:
            return {}
        weights = nnx.merge_state(state.params, state.frozen)
        return greedy_eval(
            st.sampler, weights, st.val, st.tok, reward, max_new_tokens=g.eval_max_new_tokens,
            stop_ids=stops,
        )  # fmt: skip

    def iteration(state, rng, it, clock):
        return _iteration(cfg, st, state, step_fn, reward, stops, rng, it, clock)

    state, last, before, clock, resumed = run_iterations(cfg, st, run_dir.path, iteration, evaluate)
    meta = sp.checkpoint_meta(cfg, st.tok_path)
    write_final(checkpoint_path(run_dir.path), t.keep_checkpoints, state, meta)
    after = evaluate(state)
    return rl_summary(cfg, st, run_dir.path, total, last, before, after, clock, resumed)


def _iteration(cfg, st, state, step_fn, reward, stops, rng, it: int, clock: dict):
    """One GRPO iteration: rollouts → scoring → group advantages → epochs of minibatches."""
    g, mesh = cfg.grpo, st.mesh
    t0 = time.perf_counter()
    pick = rng.choice(len(st.rows), g.prompts_per_iteration, replace=False)
    recs = [st.rows[i] for i in pick for _ in range(g.group_size)]
    weights = nnx.merge_state(state.params, state.frozen)
    ro = sample_rollouts(
        st.sampler, weights, [r["ids"] for r in recs], st.tok, seq_len=cfg.loader.seq_len,
        max_new_tokens=g.max_new_tokens, key=jax.random.fold_in(jax.random.key(cfg.seed), it),
        temperature=g.temperature, stop_ids=stops,
    )  # fmt: skip
    t1 = time.perf_counter()
    rewards = np.array([reward(x, r) for x, r in zip(ro.texts, recs)], np.float32)
    hits = np.array([arithmetic(x, r) for x, r in zip(ro.texts, recs)], np.float32)
    sc = jax.device_get(st.score(state.params, state.frozen, st.ref[1], to_global(ro.batch, mesh)))
    mask = ro.batch["mask"]
    gap, gap_max = logprob_gap(ro.batch["sampler_logp"], sc["logp"], mask, g.logprob_tol)
    adv = np.asarray(
        group_advantages(jnp.asarray(rewards), g.group_size, scale_by_std=g.scale_by_std)
    )
    full = {**ro.batch, "old_logp": sc["logp"], "ref_logp": sc["ref_logp"], "adv": adv}
    sums: dict[str, float] = {}
    steps = 0
    step_metrics = []  # read once after the epochs: no host sync between steps
    for _ in range(g.epochs):
        for idx in minibatches(len(recs), g.minibatch_size, rng):
            mb = {k: v[idx] for k, v in full.items()}
            state, m = step_fn(state, to_global(mb, mesh))
            step_metrics.append(m)
    for m in jax.device_get(step_metrics):
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        steps += 1
    t2 = time.perf_counter()
    clock["gen"] += t1 - t0
    clock["train"] += t2 - t1
    clock["tokens"] += int(ro.lengths.sum())
    row = {k: v / steps for k, v in sums.items() if k not in ("weight", "lr")}
    row.update(
        reward=float(rewards.mean()), accuracy=float(hits.mean()), logprob_gap=gap,
        logprob_gap_max=gap_max,
        entropy=float((sc["entropy"] * mask).sum() / max(mask.sum(), 1.0)),
        response_length=float(ro.lengths.mean()), lr=float(m["lr"]),
    )  # fmt: skip
    return state, row
