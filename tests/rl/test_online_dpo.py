"""`grpo.advantage: online_dpo`: the pair advantages against numpy, and the policy gradient
they give through GRPO's loss against the gradient of DPO's loss on the same pairs (exactly
equal while the policy is the one that scored them); the settings it refuses; a stage run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import ModelConfig, from_dict
from jaxllm.errors import ConfigError
from jaxllm.models import Decoder
from jaxllm.rundir import RunDir
from jaxllm.trainers import grpo
from jaxllm.trainers.advantages import online_dpo_advantages
from jaxllm.trainers.grpo import grpo_loss_fn
from jaxllm.training.losses import token_logprobs
from jaxllm.training.rl_losses import dpo_loss

from .conftest import rl_config

# three groups of three: a clear best and worst; tied best (the first of equals is taken);
# all equal (no pair)
REWARDS = np.array([0.2, 1.0, -0.5, 1.0, 1.0, 0.0, 0.3, 0.3, 0.3], np.float32)


def test_pair_advantages_against_numpy():
    rng = np.random.default_rng(1)
    logratio = rng.normal(0, 3, 9).astype(np.float32)
    beta = 0.4
    adv, stats = online_dpo_advantages(jnp.asarray(REWARDS), jnp.asarray(logratio), 3, beta)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    want, losses, wins = np.zeros(9), [], []
    for g, (best, worst) in enumerate([(1, 2), (0, 2)]):  # indices within groups 0 and 1
        b, w = 3 * g + best, 3 * g + worst
        h = float(logratio[b]) - float(logratio[w])
        want[b], want[w] = beta * sig(-beta * h), -beta * sig(-beta * h)
        losses.append(-np.log(sig(beta * h)))
        wins.append(h > 0)
    np.testing.assert_allclose(np.asarray(adv), want, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(float(stats["dpo_loss"]), np.mean(losses), rtol=1e-5)
    assert float(stats["pair_accuracy"]) == pytest.approx(np.mean(wins))
    assert float(stats["pair_fraction"]) == pytest.approx(2 / 3)


def test_the_policy_gradient_is_dpos_gradient_of_the_same_pairs():
    """GRPO's loss (ppo_clip, no KL term) with these advantages, at the policy that scored
    the log-ratios, has the gradient of DPO's summed loss -log sigmoid(beta h) over each
    group's (best, worst) pair, h of the sequence log-probs against the reference's."""
    m = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=32)
    graphdef, params = nnx.split(Decoder(m, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    n, length, beta = 9, 12, 0.5
    tokens = rng.integers(1, 64, (n, length)).astype(np.int32)
    mask = np.zeros((n, length), np.float32)
    for i in range(n):
        mask[i, 3 : 3 + rng.integers(3, 8)] = 1.0  # completions of different lengths
    batch = {
        "tokens": tokens, "targets": np.roll(tokens, -1, 1), "mask": mask,
        "segment_ids": np.ones((n, length), np.int32),
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (n, length)),
    }  # fmt: skip
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def logp_fn(p):
        logits = nnx.merge(graphdef, p)(batch["tokens"], positions_BL=batch["positions"],
                                        segment_ids_BL=batch["segment_ids"])  # fmt: skip
        return token_logprobs(logits, batch["targets"])

    old = logp_fn(params)
    ref = old - jnp.asarray(rng.normal(0, 0.5, (n, length)), jnp.float32)  # another model
    seq = lambda x: jnp.sum(x * batch["mask"], axis=-1)  # noqa: E731
    adv, _ = online_dpo_advantages(jnp.asarray(REWARDS), seq(old - ref), 3, beta)
    rl_batch = {**batch, "old_logp": old, "ref_logp": ref, "adv": adv}
    loss_fn = grpo_loss_fn(0.2, 0.0, "k3")
    g_rl = jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p), rl_batch, None)[0])(params)

    best, worst = np.array([1, 3, 6]), np.array([2, 5, 6])  # group 2: no pair (weight 0)
    w = jnp.asarray([1.0, 1.0, 0.0])

    def dpo(p):
        pi, r = seq(logp_fn(p)), seq(ref)
        return dpo_loss(pi[best], pi[worst], r[best], r[worst], beta, weight_B=w)[0]

    g_dpo = jax.grad(dpo)(params)
    flat_rl, flat_dpo = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
                         for g in (g_rl, g_dpo))  # fmt: skip
    assert np.linalg.norm(flat_dpo) > 1e-3
    np.testing.assert_allclose(flat_rl, flat_dpo, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "section,match",
    [({"advantage": "online_dpo", "loss": "gspo"}, r"'grpo.loss': online_dpo's advantages"),
     ({"dpo_beta": 0.2}, r"'grpo.dpo_beta': 0.2 is online DPO's beta"),
     ({"advantage": "online_dpo", "dpo_beta": 0.0}, r"'grpo.dpo_beta': must be > 0")],
)  # fmt: skip
def test_settings_online_dpo_refuses(section, match):
    with pytest.raises(ConfigError, match=match):
        from_dict({"stage": "grpo", "grpo": section})


@pytest.mark.slow
def test_online_dpo_stage_runs(tmp_path, tiny_ckpt):
    cfg = rl_config("grpo", tiny_ckpt, tmp_path / "odpo", iterations=2, max_new_tokens=6,
                    eval_examples=0, prompts_per_iteration=2, group_size=4, minibatch_size=8,
                    beta=0.0, epochs=1, advantage="online_dpo", rewards=["digits"],
                    reward_weights=[1.0])  # fmt: skip
    run_dir = RunDir.open(cfg)
    summary = run_dir.finish(grpo.run(cfg, run_dir))
    rows = [json.loads(x) for x in (tmp_path / "odpo/metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 2 and len(rows) == 2
    assert all({"dpo_loss", "pair_accuracy", "pair_fraction"} <= set(r) for r in rows)
    assert all(0 <= r["pair_fraction"] <= 1 for r in rows)
