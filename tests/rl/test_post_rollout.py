"""PPO's and GRPO's post-rollout math is one jitted function on global arrays: rows split
over the 8 devices go in, row-split training fields and replicated scalars come out, equal
to a numpy reference of the whole chain (KL-shaped rewards → GAE → whitening; group
advantages) and of the statistics the iteration logs."""

import math

import numpy as np
import pytest

from jaxllm.config import MeshConfig
from jaxllm.config.rl import GRPOConfig, PPOConfig
from jaxllm.sharding import make_mesh
from jaxllm.sharding.batch import row_sharding, rows_to_global
from jaxllm.trainers.grpo import grpo_post
from jaxllm.trainers.ppo import ppo_post

B, L = 16, 12


def rollout(seed: int = 0) -> tuple[dict, dict, np.ndarray]:
    """Host rows laid out like rollouts: each row's response a span after its prompt."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((B, L), np.float32)
    for i in range(B):
        start = int(rng.integers(1, 5))
        mask[i, start : start + int(rng.integers(1, L - start))] = 1.0
    logp = -rng.gamma(2.0, 0.5, (B, L)).astype(np.float32)
    scores = {
        "logp": logp, "ref_logp": logp + rng.normal(0, 0.3, (B, L)).astype(np.float32),
        "values": rng.normal(0, 1, (B, L)).astype(np.float32),
        "entropy": rng.gamma(2.0, 1.0, (B, L)).astype(np.float32),
    }  # fmt: skip
    batch = {"mask": mask, "sampler_logp": logp + rng.uniform(-1e-6, 1e-6, (B, L))}
    return scores, {k: v.astype(np.float32) for k, v in batch.items()}, rng.normal(size=B)


def np_kl(logp, ref, kind):
    d = ref.astype(np.float64) - logp
    return {"k1": -d, "k2": 0.5 * d * d, "k3": np.expm1(d) - d}[kind]


def np_ppo(scores, mask, score_B, coef, p: PPOConfig):
    kl = np_kl(scores["logp"], scores["ref_logp"], p.kl_estimator) * mask
    rewards = -coef * kl
    adv, ret = np.zeros((B, L)), np.zeros((B, L))
    for i in range(B):
        span = np.flatnonzero(mask[i])
        rewards[i, span[-1]] += score_B[i]
        last = 0.0
        for t in reversed(span):
            nxt = scores["values"][i, t + 1] if t + 1 <= span[-1] else 0.0
            last = rewards[i, t] + p.gamma * nxt - scores["values"][i, t] + p.gamma * p.lam * last
            adv[i, t], ret[i, t] = last, last + scores["values"][i, t]
    if p.whiten_advantages:
        on = mask > 0
        mean, var = adv[on].mean(), adv[on].var()
        adv = np.where(on, (adv - mean) / math.sqrt(var + 1e-8), 0.0)
    return adv, ret, kl.sum(1).mean()


def to_mesh(tree, mesh):
    return rows_to_global(tree, mesh, "dp")


def check_layout(fields, stats, mesh):
    for x in fields.values():  # the minibatch fields stay split by row: no host round trip
        assert x.sharding.is_equivalent_to(row_sharding(mesh, "dp"), x.ndim)
    for x in stats.values():  # every host reads the figures
        assert x.sharding.is_fully_replicated


@pytest.mark.parametrize("kind,whiten", [("k1", True), ("k3", False), ("k2", True)])
def test_ppo_post_matches_numpy(kind, whiten):
    mesh = make_mesh(MeshConfig(data=8, rules="dp"))
    p = PPOConfig(kl_estimator=kind, whiten_advantages=whiten, gamma=0.9, lam=0.8)
    scores, batch, score_B = rollout()
    rewards = {"reward": score_B.astype(np.float32)}
    args = to_mesh(scores, mesh), to_mesh(batch, mesh), to_mesh(rewards, mesh)
    fields, stats = ppo_post(p, mesh)(*args, np.float32(0.3))
    check_layout(fields, stats, mesh)
    adv, ret, kl = np_ppo(scores, batch["mask"], rewards["reward"], 0.3, p)
    np.testing.assert_allclose(np.asarray(fields["adv"]), adv, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(fields["returns"]), ret, atol=2e-5, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(fields["old_logp"]), scores["logp"])
    np.testing.assert_array_equal(np.asarray(fields["old_values"]), scores["values"])
    assert float(stats["kl"]) == pytest.approx(kl, rel=1e-5, abs=1e-6)
    assert float(stats["reward"]) == pytest.approx(rewards["reward"].mean(), abs=1e-6)
    tokens = batch["mask"].sum()
    assert float(stats["tokens"]) == tokens and float(stats["response_length"]) == tokens / B
    gap = np.abs(batch["sampler_logp"] - scores["logp"]) * batch["mask"]
    assert float(stats["logprob_gap"]) == pytest.approx(gap.sum() / tokens, rel=1e-3)
    assert float(stats["logprob_gap_max"]) == pytest.approx(gap.max(), rel=1e-3)


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_grpo_post_matches_numpy(scale_by_std):
    mesh = make_mesh(MeshConfig(data=8, rules="dp"))
    g = GRPOConfig(prompts_per_iteration=4, group_size=4, minibatch_size=8,
                   scale_by_std=scale_by_std)  # fmt: skip
    scores, batch, _ = rollout(1)
    reward = np.repeat([1.0, 0.0, 0.5, 2.0], 4).astype(np.float32)
    reward[[0, 5, 14]] = [0.0, 1.0, -1.0]  # groups of 4 that straddle the device rows
    hits = (reward > 0.5).astype(np.float32)
    args = to_mesh(scores, mesh), to_mesh(batch, mesh)
    fields, stats = grpo_post(g, mesh)(*args, to_mesh({"reward": reward, "accuracy": hits}, mesh))
    check_layout(fields, stats, mesh)
    r_GK = reward.reshape(4, 4).astype(np.float64)
    adv = r_GK - r_GK.mean(1, keepdims=True)
    if scale_by_std:
        adv = adv / (r_GK.std(1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(np.asarray(fields["adv"]), adv.reshape(-1), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(fields["ref_logp"]), scores["ref_logp"])
    mask = batch["mask"]
    entropy = (scores["entropy"] * mask).sum() / mask.sum()
    assert float(stats["entropy"]) == pytest.approx(entropy, rel=1e-5)
    assert float(stats["reward"]) == pytest.approx(reward.mean(), abs=1e-6)
    assert float(stats["accuracy"]) == pytest.approx(hits.mean())
