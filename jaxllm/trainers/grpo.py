"""`stage: grpo` — group-relative policy optimisation with rule rewards and/or a reward model.

Each iteration samples `group_size` completions for each of `prompts_per_iteration` prompts
with the jitted KV-cache sampler on the current weights, scores them with the weighted
rewards (rules on the texts, `model` on the rows: `grpo_rewards`), scores the tokens once (learner + frozen reference log-probs, one jitted pass; the
learner's must match the sampler's), turns rewards into advantages (one jitted function on
the global rows: the estimator `grpo.advantage` from `advantages.ADVANTAGES`, with DAPO's
group filter, overlong shaping and TIS weights when configured) and runs `epochs` passes of
minibatch steps of `grpo_loss` (the policy loss `grpo.loss` from
`policy_losses.POLICY_LOSSES`) through the generic `make_train_step` (the shared machine:
`rl_loop.py`).
All log-probs (sampler, old and new policy, reference: the ratio and the KL) and the entropy
are those of softmax(logits / grpo.temperature), the distribution the completions were
sampled from. The KL estimator is k3 or k2: k1's gradient is zero in expectation when the
KL is a loss term (config validation rejects it).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxllm.config import Config
from jaxllm.config.rl import GRPOConfig
from jaxllm.rundir import RunDir
from jaxllm.trainers.advantages import (
    ADVANTAGES,
    PAIR_ADVANTAGES,
    group_keep,
    overlong_penalty,
)
from jaxllm.trainers.rewards import arithmetic, weighted_reward
from jaxllm.trainers.rl_loop import (
    Algorithm,
    Stage,
    local_scores,
    make_post,
    run_rl,
    run_steps,
    setup_stage,
    write_final,
)
from jaxllm.trainers.rollout import policy_outputs, rule_scores
from jaxllm.training.losses import token_logprobs
from jaxllm.training.optim import lr_schedule
from jaxllm.training.policy_losses import tis_fields
from jaxllm.training.rl_losses import grpo_loss
from jaxllm.training.step import make_train_step


def grpo_loss_fn(
    clip_eps: float, beta: float, kl_kind: str, temperature: float = 1.0,
    g: GRPOConfig | None = None,
):  # fmt: skip
    """`loss_fn(model, batch, key)` on rollout minibatches (old_logp, ref_logp, adv [B], and
    `is_weight` with `tis_cap`); the policy log-probs are of softmax(logits / temperature),
    the sampling temperature. `g` picks the registry's loss, its widths and the aggregation
    (None: GRPO's defaults)."""
    g = g or GRPOConfig()
    opts = {
        "loss": g.loss, "eps_high": g.clip_eps_high or None,
        "constant_len": g.max_new_tokens if g.loss_norm == "constant" else 0,
    }  # fmt: skip

    def loss_fn(model, batch, key):
        logits_BLV, _ = policy_outputs(model, batch)  # no dropout: ratios start at 1
        logp_BL = token_logprobs(logits_BLV, batch["targets"], temperature)
        return grpo_loss(
            logp_BL, batch["old_logp"], batch["ref_logp"], batch["adv"], batch["mask"],
            clip_eps, beta, kl_kind, is_weight_BL=batch.get("is_weight"), **opts,
        )  # fmt: skip

    return loss_fn


def advantage_name(g: GRPOConfig) -> str:
    """`grpo.advantage`, with the older `scale_by_std: false` spelling of r - mean."""
    return "drgrpo" if g.advantage == "grpo" and not g.scale_by_std else g.advantage


def shaped_rewards(g: GRPOConfig, reward_B: jax.Array, mask_BL: jax.Array) -> jax.Array:
    """The rewards the advantages see: DAPO's overlong punishment added when configured."""
    if not g.overlong_buffer:
        return reward_B
    lengths_B = jnp.sum(mask_BL, axis=-1)
    pen_B = overlong_penalty(lengths_B, g.max_new_tokens, g.overlong_buffer, g.overlong_penalty)
    return reward_B + pen_B


def grpo_post(g: GRPOConfig, mesh: Mesh):
    """(scores, batch, rewards) → the minibatch fields (old and reference log-probs, group
    advantages [B]) and the iteration's reward, accuracy and entropy, on global arrays."""

    name = advantage_name(g)

    def post(scores, batch, rewards):
        mask_BL = batch["mask"]
        shaped_B = shaped_rewards(g, rewards["reward"], mask_BL)
        stats = {}
        if name in PAIR_ADVANTAGES:  # online DPO: log-ratios from the scoring pass
            logratio_B = jnp.sum((scores["logp"] - scores["ref_logp"]) * mask_BL, axis=-1)
            adv_B, stats = PAIR_ADVANTAGES[name](shaped_B, logratio_B, g.group_size, g.dpo_beta)
        else:
            adv_B = ADVANTAGES[name](shaped_B, g.group_size)
        entropy = jnp.sum(scores["entropy"] * mask_BL) / jnp.maximum(jnp.sum(mask_BL), 1.0)
        fields = {"old_logp": scores["logp"], "ref_logp": scores["ref_logp"], "adv": adv_B}
        stats.update({
            "reward": jnp.mean(rewards["reward"]),
            "accuracy": jnp.mean(rewards["accuracy"]),
            "entropy": entropy,
        })  # fmt: skip
        if g.dynamic_sampling:  # the dropped groups' tokens leave the loss and its mean
            keep_B = group_keep(rewards["reward"], g.group_size)
            fields["mask"] = mask_BL * keep_B[:, None]
            stats["kept_fraction"] = jnp.mean(keep_B)
        if g.tis_cap:
            tis, tis_stats = tis_fields(scores["logp"], batch["sampler_logp"], mask_BL, g.tis_cap)
            fields.update(tis)
            stats.update(tis_stats)
        return fields, stats

    return make_post(post, mesh)


def grpo_rewards(cfg: Config, st: Stage) -> tuple[Any, Any]:
    """(rewards(texts, recs, batch) -> r [B] on the rollout rows, scores(texts, rows) -> r [N]
    for greedy evaluation): the weighted `grpo.rewards`, rules on the decoded texts and
    `model` (the reward model at `grpo.reward_checkpoint`, else `inputs.reward_checkpoint`)
    on the rollout rows."""
    g = cfg.grpo
    rules = [(n, w) for n, w in zip(g.rewards, g.reward_weights) if n != "model"]
    rule = weighted_reward([n for n, _ in rules], [w for _, w in rules])
    rule_text = rule_scores(rule)
    if len(rules) == len(g.rewards):
        return lambda texts, recs, batch: local_scores(
            [rule(x, r) for x, r in zip(texts, recs)], st.mesh, st.rules
        ), rule_text
    from jaxllm.trainers.reward_model import model_rewards

    w = g.reward_weights[g.rewards.index("model")]
    ckpt = g.reward_checkpoint or cfg.inputs.reward_checkpoint
    batch_scores, model_text = model_rewards("grpo.reward_checkpoint", ckpt, cfg, st)

    def rewards(texts, recs, batch):
        values = local_scores([rule(x, r) for x, r in zip(texts, recs)], st.mesh, st.rules)
        return values + w * batch_scores(batch)

    return rewards, lambda texts, rows: rule_text(texts, rows) + w * model_text(texts, rows)


def grpo_algorithm(cfg: Config, st: Stage, total: int, reward) -> Algorithm:
    """GRPO's parts for the shared iteration: groups of one prompt, `reward` (the first of
    `grpo_rewards`), group advantages."""
    g = cfg.grpo
    step_fn = make_train_step(
        st.start.graphdef, grpo_loss_fn(g.clip_eps, g.beta, g.kl_estimator, g.temperature, g),
        st.tx, lr_schedule(cfg.train.optim, total), st.start.shardings, st.mesh, st.rules,
    )  # fmt: skip

    def pick(rng: np.random.Generator) -> list[dict]:
        chosen = rng.choice(len(st.rows), g.prompts_per_iteration, replace=False)
        return [st.rows[i] for i in chosen for _ in range(g.group_size)]

    def rewards(texts: list[str], recs: list[dict], batch) -> dict[str, jax.Array]:
        value = reward(texts, recs, batch)
        return {
            "reward": value + batch["env_reward"] if "env_reward" in batch else value,
            "accuracy": local_scores(
                [arithmetic(x, r) for x, r in zip(texts, recs)], st.mesh, st.rules
            ),
        }

    def report(stats: dict[str, float]) -> dict[str, float]:
        keys = ("reward", "accuracy", "entropy", "kept_fraction", "tis_weight", "tis_truncated",
                "dpo_loss", "pair_accuracy", "pair_fraction")  # fmt: skip
        return {k: stats[k] for k in keys if k in stats}

    return Algorithm(step_fn, pick, rewards, grpo_post(g, st.mesh), report)


def run(cfg: Config, run_dir: RunDir) -> dict[str, Any]:
    g, t = cfg.grpo, cfg.train
    total = run_steps(g, g.prompts_per_iteration * g.group_size)
    st = setup_stage(cfg, "grpo", total)
    meta = st.start.checkpoint_meta(cfg, st.tok_path)

    def save(state, directory):
        write_final(directory, t.keep_checkpoints, state, meta)

    rewards, scores = grpo_rewards(cfg, st)
    algo = grpo_algorithm(cfg, st, total, rewards)
    return run_rl(cfg, run_dir.path, st, algo, scores, total, save)
