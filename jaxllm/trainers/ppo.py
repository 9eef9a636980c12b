"""`stage: ppo` — PPO with a shared value head, a per-token KL penalty to the frozen
reference and the reward at the last response token (Ziegler et al. / InstructGPT recipe).

An iteration: rollouts through the jitted KV-cache sampler on the current weights → one
jitted scoring pass (learner log-probs, which must match the sampler's; reference log-probs;
values) → rewards (a rule, or a trained reward model) minus kl_coef * KL per token → GAE →
whitened advantages → `epochs` passes of minibatch steps through the generic
`make_train_step` (clipped policy loss + vf_coef * clipped value loss - ent_coef * entropy).
All log-probs (sampler, old and new policy, reference) and the entropy are those of
softmax(logits / ppo.temperature), the distribution the rollouts were sampled from.
The final checkpoint holds the plain decoder (value head dropped, LoRA merged) in the
standard format, so `stage: generate` / `export` load it by path.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import Config, PeftConfig, replace, to_dict
from jaxllm.errors import ConfigError
from jaxllm.models.heads import ScalarHead, ScalarModel
from jaxllm.models.lora import merge_lora
from jaxllm.rundir import RunDir
from jaxllm.trainers.advantages import gae, whiten
from jaxllm.trainers.lm import fresh_train_state
from jaxllm.trainers.rewards import get_reward
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
from jaxllm.training.losses import token_entropy, token_logprobs
from jaxllm.training.optim import lr_schedule, make_optimizer
from jaxllm.training.rl_losses import kl_estimate, ppo_policy_loss, ppo_value_loss
from jaxllm.training.state import to_global
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
        pl, aux = ppo_policy_loss(logp_BL, batch["old_logp"], batch["adv"], mask_BL, clip_eps)
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
    """Ziegler et al. (2019): coef *= 1 + clip(KL / target - 1, ±0.2) * n / horizon."""

    def __init__(self, coef: float, target: float, horizon: int, adaptive: bool) -> None:
        self.coef, self.target, self.horizon, self.adaptive = coef, target, horizon, adaptive

    def get_state(self) -> dict[str, float]:
        return {"coef": self.coef}

    def set_state(self, state: dict[str, float]) -> None:
        self.coef = float(state["coef"])

    def update(self, kl: float, n_steps: int) -> None:
        if self.adaptive:
            err = float(np.clip(kl / self.target - 1.0, -0.2, 0.2))
            self.coef *= 1.0 + err * n_steps / self.horizon


def shaped_rewards(score_B, logp_BL, ref_logp_BL, mask_BL, kl_coef: float, kind: str):
    """r_t = -kl_coef * KL_t, plus the sequence score at each row's last response token.
    Returns (rewards_BL, kl_BL)."""
    kl_BL = np.asarray(kl_estimate(logp_BL, ref_logp_BL, kind)) * mask_BL
    rewards_BL = -kl_coef * kl_BL
    last_B = mask_BL.shape[1] - 1 - np.argmax(mask_BL[:, ::-1] > 0, axis=1)
    rewards_BL[np.arange(len(score_B)), last_B] += score_B
    return rewards_BL, kl_BL


def _sequence_scorer(cfg: Config, st):
    """texts, rollout batch → score_B: a rule reward, or the trained reward model."""
    p = cfg.ppo
    if p.reward != "model":
        rule = get_reward(p.reward, "ppo.reward")
        return (
            lambda texts, recs, batch: np.array([rule(x, r) for x, r in zip(texts, recs)])
        ), rule
    from jaxllm.trainers.reward import load_reward_model, reward_scores

    ckpt = p.reward_checkpoint or cfg.inputs.reward_checkpoint
    if not ckpt:
        raise ConfigError(
            "config key 'ppo.reward_checkpoint': `reward: model` needs a reward checkpoint "
            "(or inputs.reward_checkpoint, which a pipeline fills from a `stage: reward`)"
        )
    rg, rstate, *_ = load_reward_model(Path(ckpt), st.mesh, cfg.mesh.rules)

    def model_score(texts, recs, batch):
        seg = batch["segment_ids"]
        out = reward_scores(rg, rstate, batch["tokens"], seg, batch["positions"])
        return np.asarray(jax.device_get(out), np.float32)

    return model_score, None


def _model_text_reward(score_fn, tok, seq_len: int, end_id: int):
    """reward(text, record) for greedy evaluation with the reward model: the prompt ids +
    the encoded answer + <|end|>, one fixed-shape row (one compiled program)."""

    def reward(text: str, rec: dict) -> float:
        ids = (list(rec["ids"]) + tok.encode(text, add_bos=False) + [end_id])[:seq_len]
        row = np.zeros((1, seq_len), np.int32)
        row[0, : len(ids)] = ids
        seg = (np.arange(seq_len)[None] < len(ids)).astype(np.int32)
        batch = {"tokens": row, "segment_ids": seg, "positions": np.arange(seq_len)[None] * seg}
        return float(score_fn([text], [rec], batch)[0])

    return reward


def run(cfg: Config, run_dir: RunDir) -> dict[str, Any]:
    p, t = cfg.ppo, cfg.train
    steps_per_iter = p.epochs * (p.rollout_batch // p.minibatch_size)
    total = p.iterations * steps_per_iter
    separate = p.critic == "separate"
    st = setup_stage(cfg, "ppo", total, wrap=functools.partial(with_value_head, separate=separate))
    score_fn, rule = _sequence_scorer(cfg, st)
    stops = stop_ids(st.template)
    text_reward = rule or _model_text_reward(score_fn, st.tok, cfg.loader.seq_len, stops[0])
    sp, mesh = st.start, st.mesh
    loss_fn = ppo_loss_fn(p.clip_eps, p.value_clip, p.vf_coef, p.ent_coef, p.temperature)
    step_fn = make_train_step(
        sp.graphdef, loss_fn, st.tx, lr_schedule(t.optim, total), sp.shardings, mesh,
        cfg.mesh.rules,
    )  # fmt: skip

    def evaluate(state):
        if not st.val:
            return {}
        weights = nnx.merge_state(state.params, state.frozen)
        return greedy_eval(
            st.sampler, weights, st.val, st.tok, text_reward,
            max_new_tokens=p.eval_max_new_tokens, stop_ids=stops,
        )  # fmt: skip

    kl_ctl = AdaptiveKL(p.kl_coef, p.kl_target, p.kl_horizon, p.adaptive_kl)

    def iteration(state, rng, it, clock):
        return _iteration(cfg, st, state, step_fn, score_fn, kl_ctl, rng, it, clock)

    state, last, before, clock, resumed = run_iterations(
        cfg, st, run_dir.path, iteration, evaluate, extra=kl_ctl
    )
    save_policy(cfg, st, state, checkpoint_path(run_dir.path))
    after = evaluate(state)
    summary = rl_summary(cfg, st, run_dir.path, total, last, before, after, clock, resumed)
    return {**summary, "final_kl_coef": round(kl_ctl.coef, 6)}


def _iteration(cfg, st, state, step_fn, score_fn, kl_ctl, rng, it: int, clock: dict):
    """One PPO iteration: rollouts → scoring → shaped rewards → GAE → epochs of minibatches."""
    p, mesh = cfg.ppo, st.mesh
    t0 = time.perf_counter()
    recs = [st.rows[i] for i in rng.choice(len(st.rows), p.rollout_batch, replace=False)]
    weights = nnx.merge_state(state.params, state.frozen)
    ro = sample_rollouts(
        st.sampler, weights, [r["ids"] for r in recs], st.tok, seq_len=cfg.loader.seq_len,
        max_new_tokens=p.max_new_tokens, key=jax.random.fold_in(jax.random.key(cfg.seed), it),
        temperature=p.temperature, stop_ids=stop_ids(st.template),
    )  # fmt: skip
    t1 = time.perf_counter()
    dev = to_global(ro.batch, mesh)
    sc = jax.device_get(st.score(state.params, state.frozen, st.ref[1], dev))
    mask = ro.batch["mask"]
    gap, gap_max = logprob_gap(ro.batch["sampler_logp"], sc["logp"], mask, p.logprob_tol)
    score_B = np.asarray(score_fn(ro.texts, recs, dev), np.float32)
    rewards_BL, kl_BL = shaped_rewards(
        score_B, sc["logp"], sc["ref_logp"], mask, kl_ctl.coef, p.kl_estimator
    )
    adv_BL, ret_BL = gae(jnp.asarray(rewards_BL), jnp.asarray(sc["values"]), mask, p.gamma, p.lam)
    if p.whiten_advantages:
        adv_BL = whiten(adv_BL, mask)
    full = {
        **ro.batch, "old_logp": sc["logp"], "old_values": sc["values"],
        "adv": np.asarray(adv_BL), "returns": np.asarray(ret_BL),
    }  # fmt: skip
    sums: dict[str, float] = {}
    steps = 0
    step_metrics = []  # read once after the epochs: no host sync between steps
    for _ in range(p.epochs):
        for idx in minibatches(p.rollout_batch, p.minibatch_size, rng):
            state, m = step_fn(state, to_global({k: v[idx] for k, v in full.items()}, mesh))
            step_metrics.append(m)
    for m in jax.device_get(step_metrics):
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        steps += 1
    t2 = time.perf_counter()
    clock["gen"] += t1 - t0
    clock["train"] += t2 - t1
    clock["tokens"] += int(ro.lengths.sum())
    kl_seq = float(kl_BL.sum(axis=1).mean())
    coef = kl_ctl.coef
    kl_ctl.update(kl_seq, p.rollout_batch)
    row = {k: v / steps for k, v in sums.items() if k not in ("weight", "lr")}
    row.update(
        reward=float(score_B.mean()), kl=kl_seq, kl_coef=coef, logprob_gap=gap,
        logprob_gap_max=gap_max,
        response_length=float(ro.lengths.mean()), lr=float(m["lr"]),
    )  # fmt: skip
    return state, row


def save_policy(cfg: Config, st, state, directory: Path) -> None:
    """The actor as a plain decoder checkpoint (value head dropped, LoRA merged), loadable
    by `load_checkpoint_model` (stage generate / export / a later stage's input)."""
    model = nnx.merge(st.start.graphdef, state.params, state.frozen)
    merge_lora(model)
    params, frozen = nnx.split(model.decoder, nnx.Param, ...)[1:]
    plain = replace(cfg, peft=PeftConfig())
    tx = make_optimizer(plain.train.optim, plain.train.steps)
    dec_state, _ = fresh_train_state(params, frozen, tx, st.mesh, cfg.mesh.rules, cfg.seed)
    dec_state = dec_state.replace(step=state.step)
    meta = {**st.start.checkpoint_meta(plain, st.tok_path), "config": to_dict(plain)}
    write_final(directory, cfg.train.keep_checkpoints, dec_state, meta)
