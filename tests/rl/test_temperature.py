"""Rollouts at temperature T != 1: the sampler's log-probs, the learner's (scoring pass and the
PPO / GRPO losses), the reference's and the entropy are all those of softmax(logits / T), the
distribution the tokens were drawn from, checked against numpy; the sampler/learner agreement
check compares tempered with tempered and catches an untempered learner."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.models import Decoder
from jaxllm.trainers.grpo import grpo_loss_fn
from jaxllm.trainers.ppo import ppo_loss_fn, with_value_head
from jaxllm.trainers.rl_loop import setup_stage
from jaxllm.trainers.rollout import (
    StaleRollout,
    logprob_gap,
    make_scoring_pass,
    policy_outputs,
    sample_rollouts,
    stop_ids,
)
from jaxllm.training.state import to_global

from .conftest import rl_config

T = 0.5


def np_log_softmax(z, temperature):
    z = np.asarray(z, np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_token_logprobs(logits_BLV, targets_BL, temperature):
    logp_BLV = np_log_softmax(logits_BLV, temperature)
    return np.take_along_axis(logp_BLV, targets_BL[..., None], axis=-1)[..., 0]


def np_entropy(logits_BLV, temperature):
    logp_BLV = np_log_softmax(logits_BLV, temperature)
    return -(np.exp(logp_BLV) * logp_BLV).sum(-1)


def test_tempered_sampler_learner_and_reference_logprobs_agree(tmp_path, tiny_ckpt):
    sec = dict(iterations=1, max_new_tokens=6, eval_examples=0, temperature=T)
    sec.update(prompts_per_iteration=2, group_size=4, minibatch_size=8, beta=0.05)
    cfg = rl_config("grpo", tiny_ckpt, tmp_path / "g", **sec)
    st = setup_stage(cfg, "grpo", 1)
    sp = st.start
    by_len = sorted(st.rows, key=lambda r: len(r["ids"]))
    prompts = [by_len[i]["ids"] for i in np.linspace(0, len(by_len) - 1, 8).astype(int)]
    assert len({len(p) for p in prompts}) >= 3  # prompts of different lengths
    ro = sample_rollouts(
        st.sampler, nnx.merge_state(sp.state.params, sp.state.frozen), prompts, st.tok,
        seq_len=cfg.loader.seq_len, max_new_tokens=6, key=jax.random.key(3), temperature=T,
        stop_ids=stop_ids(st.template),
    )  # fmt: skip
    batch, mask = ro.batch, ro.batch["mask"]
    assert mask.sum() >= 8
    dev = to_global(batch, st.mesh)
    sc = jax.device_get(st.score(sp.state.params, sp.state.frozen, st.ref[1], dev))
    on = mask > 0
    # the sampler's log-probs are the learner's tempered ones (f32, cached vs full forward)
    np.testing.assert_allclose(batch["sampler_logp"][on], sc["logp"][on], atol=1e-5, rtol=0)
    assert logprob_gap(batch["sampler_logp"], sc["logp"], mask, 1e-5)[1] <= 1e-5
    # learner, reference and entropy against numpy's log_softmax(z / T) of each model's logits
    targets = batch["targets"]
    z = np.asarray(policy_outputs(nnx.merge(sp.graphdef, sp.state.params, sp.state.frozen),
                                  dev)[0])  # fmt: skip
    z_ref = np.asarray(policy_outputs(nnx.merge(*st.ref), dev)[0])
    want = np_token_logprobs(z, targets, T)
    np.testing.assert_allclose(sc["logp"][on], want[on], atol=1e-5, rtol=0)
    np.testing.assert_allclose(batch["sampler_logp"][on], want[on], atol=1e-5, rtol=0)
    want_ref = np_token_logprobs(z_ref, targets, T)
    np.testing.assert_allclose(sc["ref_logp"][on], want_ref[on], atol=1e-5, rtol=0)
    np.testing.assert_allclose(sc["entropy"][on], np_entropy(z, T)[on], atol=1e-4, rtol=1e-5)
    assert np.abs(np_token_logprobs(z, targets, 1.0) - want)[on].max() > 1e-2  # T matters
    # an untempered learner (the old behaviour) fails the agreement check
    raw = make_scoring_pass(sp.graphdef, st.ref[0], st.mesh, cfg.mesh.rules)
    raw_logp = jax.device_get(raw(sp.state.params, sp.state.frozen, st.ref[1], dev))["logp"]
    with pytest.raises(StaleRollout):
        logprob_gap(batch["sampler_logp"], raw_logp, mask, cfg.grpo.logprob_tol)


def _small_batch(model, b=4, length=12):
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 50, (b, length)).astype(np.int32)
    mask = np.zeros((b, length), np.float32)
    for i, start in enumerate((2, 3, 5, 7)):  # responses after prompts of different lengths
        mask[i, start:10] = 1.0
    batch = dict(
        tokens=tokens, targets=np.roll(tokens, -1, 1), mask=mask,
        segment_ids=np.ones((b, length), np.int32),
        positions=np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)),
    )  # fmt: skip
    z = np.asarray(policy_outputs(model, batch)[0])
    return batch, z


def test_ppo_and_grpo_losses_use_the_rollout_temperature():
    m = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=32)
    model = with_value_head(Decoder(m, rngs=nnx.Rngs(0)), nnx.Rngs(1))
    batch, z = _small_batch(model)
    mask, on = batch["mask"], batch["mask"] > 0
    logp = np_token_logprobs(z, batch["targets"], T).astype(np.float32)  # the rollout's
    ent = float((np_entropy(z, T) * mask).sum())
    rng = np.random.default_rng(1)
    ppo_batch = {
        **batch, "old_logp": logp, "old_values": np.zeros_like(mask),
        "returns": np.zeros_like(mask), "adv": rng.normal(size=mask.shape).astype(np.float32),
    }  # fmt: skip
    ppo_batch = {k: jnp.asarray(v) for k, v in ppo_batch.items()}
    _, aux = ppo_loss_fn(0.2, 0.2, 0.5, 0.01, temperature=T)(model, ppo_batch, None)
    np.testing.assert_allclose(float(aux["entropy"]), ent, rtol=1e-5)
    assert float(aux["clip_frac"]) == 0.0 and abs(float(aux["approx_kl"])) < 1e-6  # ratio 1
    _, aux = ppo_loss_fn(0.2, 0.2, 0.5, 0.01)(model, ppo_batch, None)  # untempered: off
    assert float(aux["clip_frac"]) > 0
    # GRPO: ratio 1 against the tempered rollout log-probs, k3 KL to a tempered reference
    ref = (logp - 0.1 * mask).astype(np.float32)
    adv = np.array([1.0, -0.5, 0.25, -0.75], np.float32)
    grpo_batch = {**batch, "old_logp": logp, "ref_logp": ref, "adv": adv}
    grpo_batch = {k: jnp.asarray(v) for k, v in grpo_batch.items()}
    loss, aux = grpo_loss_fn(0.2, 0.05, "k3", temperature=T)(model, grpo_batch, None)
    kl = np.expm1(ref - logp) - (ref - logp)
    np.testing.assert_allclose(float(aux["kl"]), kl[on].sum(), rtol=1e-4)
    want = ((-adv[:, None] + 0.05 * kl) * mask).sum()
    np.testing.assert_allclose(float(loss), want, rtol=1e-4, atol=1e-5)
    assert float(aux["clip_frac"]) == 0.0
