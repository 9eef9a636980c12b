"""Records the GRPO/PPO losses, their gradients and the advantages of the code at hand on fixed
seeded inputs → tests/training/data/rl_losses_main.npz. Run once at main (2f50db7) before the
policy-loss registry refactor; tests/training/test_rl_registry.py checks the refactored default
paths reproduce these arrays bit for bit."""

from pathlib import Path

import jax
import numpy as np

from jaxllm.trainers.advantages import gae, group_advantages, whiten
from jaxllm.training.rl_losses import grpo_loss, ppo_policy_loss


def inputs():
    rng = np.random.default_rng(26)
    B, L = 16, 12
    logp = (rng.normal(size=(B, L)) * 0.5 - 2).astype(np.float32)
    old = (logp + rng.normal(size=(B, L)) * 0.3).astype(np.float32)
    ref = (logp + rng.normal(size=(B, L)) * 0.2).astype(np.float32)
    lengths = rng.integers(1, L + 1, size=B)
    mask = (np.arange(L)[None, :] < lengths[:, None]).astype(np.float32)
    rewards = rng.integers(0, 2, size=B).astype(np.float32) + 0.1 * rng.integers(0, 2, size=B)
    values = rng.normal(size=(B, L)).astype(np.float32)
    tok_rewards = rng.normal(size=(B, L)).astype(np.float32)
    return dict(
        logp=logp,
        old=old,
        ref=ref,
        mask=mask,
        rewards=rewards.astype(np.float32),
        values=values,
        tok_rewards=tok_rewards,
    )


def compute(x):
    adv = jax.jit(group_advantages, static_argnums=1)(x["rewards"], 4)
    adv_nostd = jax.jit(lambda r: group_advantages(r, 4, scale_by_std=False))(x["rewards"])

    def grpo(lp):
        return grpo_loss(lp, x["old"], x["ref"], adv, x["mask"], 0.2, 0.1, "k3")

    (gl, gaux), gg = jax.jit(jax.value_and_grad(grpo, has_aux=True))(x["logp"])
    a_gae, ret = jax.jit(gae, static_argnums=(3, 4))(
        x["tok_rewards"], x["values"], x["mask"], 1.0, 0.95
    )
    a_w = jax.jit(whiten)(a_gae, x["mask"])

    def ppo(lp):
        return ppo_policy_loss(lp, x["old"], a_w, x["mask"], 0.2)

    (pl, paux), pg = jax.jit(jax.value_and_grad(ppo, has_aux=True))(x["logp"])
    out = dict(
        adv=adv,
        adv_nostd=adv_nostd,
        grpo_loss=gl,
        grpo_grad=gg,
        grpo_kl=gaux["kl"],
        grpo_clip=gaux["clip_frac"],
        gae=a_gae,
        gae_ret=ret,
        gae_white=a_w,
        ppo_loss=pl,
        ppo_grad=pg,
        ppo_kl=paux["approx_kl"],
        ppo_clip=paux["clip_frac"],
    )
    return {k: np.asarray(v) for k, v in out.items()}


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "tests/training/data/rl_losses_main.npz"
    np.savez(out, **compute(inputs()))
    print(out)
