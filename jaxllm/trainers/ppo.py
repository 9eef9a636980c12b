"""`stage: ppo` — PPO with a shared value head, a per-token KL penalty to the frozen
reference and the reward at the last response token (Ziegler et al. / InstructGPT recipe).

An iteration (the shared machine: `rl_loop.py`): rollouts through the jitted KV-cache
sampler on the current weights → one jitted scoring pass (learner log-probs, which must
match the sampler's; reference log-probs; values) → sequence scores (a rule on each
process's decoded texts, or a trained reward model on the global rows) → one jitted
function: rewards minus kl_coef * KL per token → GAE → whitened advantages → `epochs`
passes of minibatch steps through the generic `make_train_step` (clipped policy loss +
vf_coef * clipped value loss - ent_coef * entropy).
All log-probs (sampler, old and new policy, reference) and the entropy are those of
softmax(logits / ppo.temperature), the distribution the rollouts were sampled from.
The final checkpoint holds the plain decoder (value head dropped, LoRA merged) in the
standard format, so `stage: generate` / `export` load it by path.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxllm.config import Config, PeftConfig, QuantizeConfig, replace, to_dict
from jaxllm.config.rl import PPOConfig
from jaxllm.errors import ConfigError
from jaxllm.models.heads import ScalarHead, ScalarModel
from jaxllm.models.lora import merge_lora
from jaxllm.models.peft import peft_method
from jaxllm.models.quant import dequantize_model
from jaxllm.rundir import RunDir
from jaxllm.trainers.advantages import gae, whiten
from jaxllm.trainers.lm import fresh_train_state
from jaxllm.trainers.rewards import get_reward, weighted_reward
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
from jaxllm.trainers.rollout import TextScores, policy_outputs, rule_scores
from jaxllm.training.losses import token_entropy, token_logprobs
from jaxllm.training.optim import lr_schedule, make_optimizer
from jaxllm.training.policy_losses import tis_fields
from jaxllm.training.rl_losses import kl_estimate, ppo_policy_loss, ppo_value_loss
from jaxllm.training.step import make_train_step


class ActorCritic(nnx.Module):
    """A decoder and a critic: `model(tokens) -> (logits, values)`. The critic is a value head
    on the actor's final features (`separate=False`: one backbone, trained by both losses) or
    its own copy of the backbone with a head (`separate=True`: twice the weights, no
    interference between the value and policy gradients). `extend` / `init_cache` / `cfg` are
    the decoder's, so the `Sampler` runs it directly on the very weights the learner trains."""

    def __init__(self, decoder: nnx.Module, *, rngs: nnx.Rngs, separate: bool = False):
        self.decoder = decoder
        self.head = None if separate else ScalarHead(decoder.cfg.d_model, rngs=rngs)
        self.critic = ScalarModel(nnx.clone(decoder), rngs=rngs) if separate else None

    @property
    def cfg(self):
        return self.decoder.cfg

    def __call__(self, tokens_BL: jax.Array, **kwargs) -> tuple[jax.Array, jax.Array]:
        x_BLD = self.decoder.features(tokens_BL, **kwargs)
        values_BL = self.head(x_BLD) if self.critic is None else self.critic(tokens_BL, **kwargs)
        return self.decoder.logits(x_BLD), values_BL

    def extend(self, *args, **kwargs):
        return self.decoder.extend(*args, **kwargs)

    def init_cache(self, batch: int, size: int):
        return self.decoder.init_cache(batch, size)


def with_value_head(decoder: nnx.Module, rngs: nnx.Rngs, separate: bool = False) -> ActorCritic:
    return ActorCritic(decoder, rngs=rngs, separate=separate)


def ppo_loss_fn(
    clip_eps: float, value_clip: float, vf_coef: float, ent_coef: float, temperature: float = 1.0
):
    """`loss_fn(model, batch, key)`: clipped policy + vf_coef * clipped value - ent_coef *
    entropy, summed over response tokens (aux sums share the token weight). Log-probs and
    entropy are of softmax(logits / temperature), the rollouts' sampling temperature."""

    def loss_fn(model, batch, key):
        logits_BLV, values_BL = policy_outputs(model, batch)  # no dropout: ratios start at 1
        logp_BL = token_logprobs(logits_BLV, batch["targets"], temperature)
        mask_BL = batch["mask"]
        pl, aux = ppo_policy_loss(
            logp_BL, batch["old_logp"], batch["adv"], mask_BL, clip_eps, batch.get("is_weight")
        )
        vl, vaux = ppo_value_loss(
            values_BL, batch["old_values"], batch["returns"], mask_BL, value_clip
        )
        ent = jnp.sum(token_entropy(logits_BLV, temperature) * mask_BL)
        loss = pl + vf_coef * vl - ent_coef * ent
        return loss, {
            **aux, "policy_loss": pl, "value_loss": vl, "entropy": ent,
            "value_clip_frac": vaux["value_clip_frac"],
        }  # fmt: skip

    return loss_fn


class AdaptiveKL:
    """Ziegler et al. (2019): coef *= 1 + clip(KL / target - 1, ±0.2) * n / horizon, never
    below `floor`. The floor matters because the KL starts at 0: without one the first
    iterations only shrink the coefficient (0.8x per iteration at n / horizon = 1), and the
    policy then runs far past the target before the coefficient has grown back."""

    def __init__(
        self, coef: float, target: float, horizon: int, adaptive: bool, floor: float = 0.0
    ) -> None:
        self.coef, self.target, self.horizon, self.adaptive = coef, target, horizon, adaptive
        self.floor = floor

    def get_state(self) -> dict[str, float]:
        return {"coef": self.coef}

    def set_state(self, state: dict[str, float]) -> None:
        self.coef = float(state["coef"])

    def update(self, kl: float, n_steps: int) -> None:
        if self.adaptive:
            err = float(np.clip(kl / self.target - 1.0, -0.2, 0.2))
            self.coef = max(self.coef * (1.0 + err * n_steps / self.horizon), self.floor)


def shaped_rewards(score_B, logp_BL, ref_logp_BL, mask_BL, kl_coef, kind: str):
    """r_t = -kl_coef * KL_t, plus the sequence score at each row's last response token.
    Returns (rewards_BL, kl_BL)."""
    mask_BL = jnp.asarray(mask_BL)
    kl_BL = kl_estimate(logp_BL, ref_logp_BL, kind) * mask_BL
    rewards_BL = -kl_coef * kl_BL
    last_B = mask_BL.shape[1] - 1 - jnp.argmax(mask_BL[:, ::-1] > 0, axis=1)
    rewards_BL = rewards_BL.at[jnp.arange(mask_BL.shape[0]), last_B].add(score_B)
    return rewards_BL, kl_BL


def ppo_post(p: PPOConfig, mesh: Mesh):
    """(scores, batch, rewards, kl_coef) → the minibatch fields (old log-probs and values,
    advantages, returns) and the iteration's mean reward and sequence KL, on global arrays."""

    def post(scores, batch, rewards, kl_coef):
        mask_BL, score_B = batch["mask"], rewards["reward"]
        rewards_BL, kl_BL = shaped_rewards(
            score_B, scores["logp"], scores["ref_logp"], mask_BL, kl_coef, p.kl_estimator
        )
        adv_BL, ret_BL = gae(rewards_BL, scores["values"], mask_BL, p.gamma, p.lam)
        if p.whiten_advantages:
            adv_BL = whiten(adv_BL, mask_BL)
        fields = {
            "old_logp": scores["logp"], "old_values": scores["values"], "adv": adv_BL,
            "returns": ret_BL,
        }  # fmt: skip
        stats = {"reward": jnp.mean(score_B), "kl": jnp.mean(jnp.sum(kl_BL, axis=1))}
        if p.tis_cap:  # sampler/learner correction (truncated IS), logged
            tis, tis_stats = tis_fields(scores["logp"], batch["sampler_logp"], mask_BL, p.tis_cap)
            fields.update(tis)
            stats.update(tis_stats)
        return fields, stats

    return make_post(post, mesh)


def ppo_algorithm(cfg: Config, st: Stage, total: int, kl_ctl: AdaptiveKL, rewards) -> Algorithm:
    """PPO's parts for the shared iteration: one response per prompt, the sequence scores
    `rewards`, shaped rewards → GAE, the adaptive KL coefficient."""
    p = cfg.ppo
    loss_fn = ppo_loss_fn(p.clip_eps, p.value_clip, p.vf_coef, p.ent_coef, p.temperature)
    step_fn = make_train_step(
        st.start.graphdef, loss_fn, st.tx, lr_schedule(cfg.train.optim, total),
        st.start.shardings, st.mesh, st.rules,
    )  # fmt: skip
    post = ppo_post(p, st.mesh)

    def pick(rng: np.random.Generator) -> list[dict]:
        return [st.rows[i] for i in rng.choice(len(st.rows), p.rollout_batch, replace=False)]

    def report(stats: dict[str, float]) -> dict[str, float]:
        coef = kl_ctl.coef
        kl_ctl.update(stats["kl"], p.rollout_batch)
        tis = {k: stats[k] for k in ("tis_weight", "tis_truncated") if k in stats}
        return {"reward": stats["reward"], "kl": stats["kl"], "kl_coef": coef, **tis}

    def post_now(scores, batch, rewards):  # the coefficient of this iteration
        return post(scores, batch, rewards, np.float32(kl_ctl.coef))

    return Algorithm(step_fn, pick, rewards, post_now, report)


def sequence_rewards(cfg: Config, st: Stage) -> tuple[Any, TextScores]:
    """(rewards(texts, rows, batch) for the iterations, scores(texts, rows) for greedy
    evaluation): `ppo.reward` (a rule on the decoded texts, or the trained reward model on the
    rows), plus the weighted `ppo.rule_rewards` in training."""
    rewards, scores = base_rewards(cfg, st)
    p = cfg.ppo
    if not p.rule_rewards:
        return rewards, scores
    extra = weighted_reward(p.rule_rewards, p.rule_weights, "ppo.rule_rewards")

    def with_rules(texts, recs, batch):
        out = rewards(texts, recs, batch)
        terms = local_scores([extra(x, r) for x, r in zip(texts, recs)], st.mesh, st.rules)
        return {**out, "reward": out["reward"] + terms}

    return with_rules, scores


def base_rewards(cfg: Config, st: Stage) -> tuple[Any, TextScores]:
    """`ppo.reward` alone: a rule, or the trained reward model."""
    p = cfg.ppo
    if p.reward != "model":
        rule = get_reward(p.reward, "ppo.reward")

        def rule_rewards(texts, recs, batch):
            values = [rule(x, r) for x, r in zip(texts, recs)]
            return {"reward": local_scores(values, st.mesh, st.rules)}

        return rule_rewards, rule_scores(rule)
    from jaxllm.trainers.reward_model import model_rewards

    ckpt = p.reward_checkpoint or cfg.inputs.reward_checkpoint
    batch_scores, text_scores = model_rewards("ppo.reward_checkpoint", ckpt, cfg, st)
    return lambda texts, recs, batch: {"reward": batch_scores(batch)}, text_scores


def run(cfg: Config, run_dir: RunDir) -> dict[str, Any]:
    p = cfg.ppo
    if cfg.peft.enabled and not peft_method(cfg.peft.method).mergeable:
        raise ConfigError(
            f"config key 'peft.method': ppo saves its policy as plain weights, and "
            f"{cfg.peft.method} cannot be merged into them; use lora (or grpo)"
        )
    total = run_steps(p, p.rollout_batch)
    wrap = functools.partial(with_value_head, separate=p.critic == "separate")
    st = setup_stage(cfg, "ppo", total, wrap=wrap)
    rewards, scores = sequence_rewards(cfg, st)
    kl_ctl = AdaptiveKL(p.kl_coef, p.kl_target, p.kl_horizon, p.adaptive_kl, p.kl_coef_min)
    algo = ppo_algorithm(cfg, st, total, kl_ctl, rewards)
    save = functools.partial(save_policy, cfg, st)
    summary = run_rl(cfg, run_dir.path, st, algo, scores, total, save, extra=kl_ctl)
    return {**summary, "final_kl_coef": round(kl_ctl.coef, 6)}


def save_policy(cfg: Config, st, state, directory: Path) -> None:
    """The actor as a plain decoder checkpoint (value head dropped, LoRA merged; QLoRA's int
    base dequantised first, so the float weights are the trained policy's), loadable by
    `load_checkpoint_model` (stage generate / export / a later stage's input)."""
    model = nnx.merge(st.start.graphdef, state.params, state.frozen)
    dequantize_model(model)
    merge_lora(model)
    params, frozen = nnx.split(model.decoder, nnx.Param, ...)[1:]
    plain = replace(cfg, peft=PeftConfig(), quantize=QuantizeConfig())
    tx = make_optimizer(plain.train.optim, plain.train.steps)
    dec_state, _ = fresh_train_state(params, frozen, tx, st.mesh, cfg.mesh.rules, cfg.seed)
    dec_state = dec_state.replace(step=state.step)
    meta = {**st.start.checkpoint_meta(plain, st.tok_path), "config": to_dict(plain)}
    write_final(directory, cfg.train.keep_checkpoints, dec_state, meta)
