"""`stage: ppo` and `stage: grpo` end to end on a tiny pretrained model (2 iterations each),
plus the invariants RL depends on: sampler and learner log-probs of the same tokens agree,
the frozen reference stays bit-identical while the policy moves."""

import dataclasses
import json
import math
import os
import shutil
import signal

import jax
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import replace
from jaxllm.errors import ConfigError
from jaxllm.rundir import RunDir
from jaxllm.trainers import grpo, ppo
from jaxllm.trainers.lm import load_checkpoint_model
from jaxllm.trainers.rl_iteration import rl_iteration
from jaxllm.trainers.rl_loop import local_scores, setup_stage
from jaxllm.trainers.rollout import logprob_gap, sample_rollouts, stop_ids
from jaxllm.training.preemption import Preempted
from jaxllm.training.state import to_global

from ..conftest import split_over_devices
from .conftest import rl_config

SMALL = dict(iterations=2, max_new_tokens=6, eval_examples=4, eval_max_new_tokens=4)


def _run(module, cfg) -> dict:
    run_dir = RunDir.open(cfg)
    return run_dir.finish(module.run(cfg, run_dir))


def _finite_metrics(path) -> list[dict]:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
        assert r["logprob_gap"] < 1e-4
    return rows


@pytest.mark.slow
def test_ppo_stage_two_iterations_and_resume(tmp_path, tiny_ckpt):
    sec = dict(SMALL, rollout_batch=16, minibatch_size=8, epochs=2, reward="digits")
    sec.update(checkpoint_every=1, adaptive_kl=True, kl_target=0.01, kl_horizon=16)
    sec.update(eval_examples=5, eval_rules=["polite", "arithmetic"])  # 5: not a multiple of 8
    cfg = rl_config("ppo", tiny_ckpt, tmp_path / "ppo", **sec)
    summary = _run(ppo, cfg)
    rows = _finite_metrics(tmp_path / "ppo/metrics.jsonl")
    for key in ("reward", "kl", "clip_frac", "value_loss", "entropy", "response_length"):
        assert key in rows[-1]
    for key in ("polite", "arithmetic", "repeat_3gram", "distinct_2", "well_formed"):
        assert 0 <= rows[-1][key] <= 1, key  # the rollouts' rule rates and degeneration
    assert summary["steps"] == 8 and 0 < summary["generate_share"] < 1
    assert summary["rollout_tokens_per_s"] > 0 and "greedy_reward_after" in summary
    assert summary["final_kl_coef"] != rows[1]["kl_coef"] != rows[0]["kl_coef"]  # adapting
    # held-out figures before/after: rule rates, degeneration, exact KL to the reference
    for key in ("polite", "arithmetic", "repeat_3gram", "distinct_2", "well_formed", "kl"):
        assert f"greedy_{key}_before" in summary and f"greedy_{key}_after" in summary, key
    assert summary["greedy_arithmetic_after"] == summary["greedy_accuracy_after"]
    # (the digits reward is 0 on these prompts, so the policy need not move: test_rl_eval.py
    # checks the KL of a moved policy)
    assert abs(summary["greedy_kl_before"]) < 1e-4 and summary["greedy_kl_after"] >= 0
    pairs = summary["side_by_side"]
    assert len(pairs) == 4 and all(set(p) == {"prompt", "before", "after"} for p in pairs)
    assert all(p["prompt"] and "<|user|>" not in p["prompt"] for p in pairs)
    every = [json.loads(x) for x in (tmp_path / "ppo/heldout_answers.jsonl").open()]
    assert len(every) == 5 and all(p in every for p in pairs)  # all held-out prompts, once
    # the final checkpoint is a plain decoder in the standard format (generate/export load it)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    _, state, m, meta = load_checkpoint_model(tmp_path / "ppo/checkpoints", mesh)
    assert m.d_model == 32 and "decoder" not in state and "blocks" in state
    assert (tmp_path / "ppo/loss.png").exists()
    # a crash during iteration 2: the run resumes after iteration 1 (weights, value head,
    # optimizer, RNG, KL coefficient) and repeats iteration 2 and the final figures exactly
    shutil.rmtree(tmp_path / "ppo/resume/2")
    shutil.rmtree(tmp_path / "ppo/checkpoints")
    (tmp_path / "ppo/summary.json").unlink()
    again = _run(ppo, cfg)
    rows_again = _finite_metrics(tmp_path / "ppo/metrics.jsonl")
    assert summary["resumed_from_iteration"] == 0 and again["resumed_from_iteration"] == 1
    assert rows_again[1]["loss"] == rows[1]["loss"] and rows_again[1]["kl"] == rows[1]["kl"]
    for key in ("final_kl_coef", "greedy_reward_before", "greedy_reward_after", "final_loss"):
        assert again[key] == summary[key], key
    assert again["side_by_side"] == summary["side_by_side"]  # the before answers resume too


def test_grpo_stage_two_iterations(tmp_path, tiny_ckpt):
    sec = dict(SMALL, prompts_per_iteration=2, group_size=4, minibatch_size=8, beta=0.05, epochs=1)
    sec["eval_examples"] = 0  # the PPO test covers greedy before/after: one compile less
    cfg = rl_config("grpo", tiny_ckpt, tmp_path / "grpo", **sec)
    summary = _run(grpo, cfg)
    rows = _finite_metrics(tmp_path / "grpo/metrics.jsonl")
    assert {"reward", "kl", "clip_frac", "accuracy", "entropy"} <= set(rows[-1])
    assert summary["steps"] == 2 and summary["generate_share"] > 0
    assert (tmp_path / "grpo/checkpoints").is_dir() and (tmp_path / "grpo/loss.png").exists()
    # killed after the final checkpoint, before the summary: the restart trains no more
    (tmp_path / "grpo/summary.json").unlink()
    again = _run(grpo, cfg)
    assert again["final_loss"] == summary["final_loss"] and again["steps"] == 2
    assert again["resumed_from_iteration"] == 2
    assert sorted(p.name for p in (tmp_path / "grpo/checkpoints").iterdir()) == ["2"]


def test_sampler_matches_learner_and_reference_is_frozen(tmp_path, tiny_ckpt, prefills):
    g = dict(SMALL, prompts_per_iteration=2, group_size=4, minibatch_size=8, epochs=2)
    cfg = rl_config("grpo", tiny_ckpt, tmp_path / "g", **g)
    cfg = replace(cfg, train=replace(cfg.train, optim=replace(cfg.train.optim, lr=1e-2)))
    st = setup_stage(cfg, "grpo", 4)
    sp = st.start

    def rewards(texts, recs, batch):  # varies within a group even for an untrained model
        return {
            "reward": local_scores([float(len(t)) for t in texts], st.mesh, st.rules),
            "accuracy": local_scores([0.0] * len(texts), st.mesh, st.rules),
        }

    algo = grpo.grpo_algorithm(cfg, st, 4, grpo.grpo_rewards(cfg, st)[0])
    algo = dataclasses.replace(algo, rewards=rewards)
    ref_before = jax.tree.map(np.array, st.ref[1])
    policy_before = jax.tree.map(np.array, sp.state.params)
    state, rng = sp.state, np.random.default_rng(0)
    clock = {"gen": 0.0, "train": 0.0, "tokens": 0}
    for it in (1, 2):  # the second iteration samples with updated weights: still agrees
        state, row = rl_iteration(cfg, st, algo, state, rng, it, clock)
        assert row["logprob_gap"] < 1e-4
    for tokens, weights in prefills:  # rollouts are data parallel: each device its rows
        split_over_devices(tokens, weights)
    for a, b in zip(jax.tree.leaves(ref_before), jax.tree.leaves(st.ref[1])):
        np.testing.assert_array_equal(a, np.asarray(b))
    moved = [not np.array_equal(a, np.asarray(b))
             for a, b in zip(jax.tree.leaves(policy_before), jax.tree.leaves(state.params))]  # fmt: skip
    assert any(moved)
    # a direct check of the gap on a fresh rollout with the trained weights
    weights = nnx.merge_state(state.params, state.frozen)
    ro = sample_rollouts(
        st.sampler, weights, [r["ids"] for r in st.rows[:8]], st.tok, seq_len=cfg.loader.seq_len,
        max_new_tokens=6, key=jax.random.key(3), temperature=1.0, stop_ids=stop_ids(st.template),
    )  # fmt: skip
    sc = st.score(state.params, state.frozen, st.ref[1], to_global(ro.batch, st.mesh))
    gap, worst = logprob_gap(
        ro.batch["sampler_logp"], jax.device_get(sc["logp"]), ro.batch["mask"], 1e-4
    )
    assert gap <= worst < 1e-4 and ro.batch["mask"].sum() > 0


def test_ppo_rule_terms_are_added_to_the_training_reward_only(tmp_path, tiny_ckpt):
    sec = dict(SMALL, rollout_batch=8, minibatch_size=8, reward="digits")
    sec.update(rule_rewards=["polite", "chosen_f1"], rule_weights=[2.0, 0.5])
    cfg = rl_config("ppo", tiny_ckpt, tmp_path / "p", **sec)
    st = setup_stage(cfg, "ppo", 1)
    rewards, scores = ppo.sequence_rewards(cfg, st)
    texts = ["Happy to help! 42", "42", "Not my problem.", "Hope that helps! the red box"] * 2
    recs = [{"answer": "42", "chosen": "the red box is here"}] * 8
    got = np.asarray(jax.device_get(rewards(texts, recs, {})["reward"]))
    # by hand: digits 0/1/0/0 (a number alone scores), polite 1/0/0/1, F1 to "the red box is here" 0/0/0/f1
    f1 = 2 * (3 / 6) * (3 / 5) / (3 / 6 + 3 / 5)  # "hope that helps the red box": 3 of 6 words
    want = [0 + 2, 1, 0, 0 + 2 + 0.5 * f1] * 2
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # the greedy before/after reward figure is `reward` alone
    np.testing.assert_allclose(scores(texts, recs), [0, 1, 0, 0] * 2)
    with pytest.raises(ConfigError, match="one weight per rule"):
        rl_config("ppo", tiny_ckpt, tmp_path / "q", rule_rewards=["polite"], rule_weights=[])


def test_too_few_prompts_for_an_iteration_is_a_config_error(tmp_path, tiny_ckpt):
    prompts = tmp_path / "three.jsonl"
    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1), "task": "math"} for i in range(3)]
    rows.append({"prompt": "Name a colour.", "answer": "red", "task": "chat"})  # filtered out
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sec = dict(SMALL, prompt_file=str(prompts), group_size=4, minibatch_size=8)
    cfg = rl_config("grpo", tiny_ckpt, tmp_path / "g", **sec, prompts_per_iteration=4)
    with pytest.raises(ConfigError, match=r"'grpo.prompts_per_iteration': 4 .* only 3 in"):
        setup_stage(cfg, "grpo", 1)
    cfg = rl_config("ppo", tiny_ckpt, tmp_path / "p", prompt_file=str(prompts), task="math",
                    rollout_batch=8, minibatch_size=8)  # fmt: skip
    with pytest.raises(ConfigError, match=r"'ppo.rollout_batch': 8 .* only 3 in"):
        setup_stage(cfg, "ppo", 1)
    setup_stage(rl_config("grpo", tiny_ckpt, tmp_path / "h", **sec, prompts_per_iteration=2),
                "grpo", 1)  # fmt: skip
    accum = replace(cfg, **{"train.grad_accum": 2})  # the RL steps never accumulated
    with pytest.raises(ConfigError, match=r"'train.grad_accum': ppo takes one optimizer step"):
        setup_stage(accum, "ppo", 1)


def test_an_empty_prompt_file_is_reported_as_empty(tmp_path, template):
    """Not as "no prompt fits in N tokens": the file holds no record (its config key named);
    a prompt with a non-string "system" fails at file:line (it was dropped)."""
    from jaxllm.errors import DataError
    from jaxllm.trainers.rollout import load_prompts

    empty = tmp_path / "empty.jsonl"
    empty.write_text(" " * 30 + "\n\n")
    for key in ("grpo.prompt_file", "ppo.val_file"):
        with pytest.raises(DataError) as e:
            load_prompts(str(empty), key, template, "", 64)
        assert str(e.value).startswith(f"config key '{key}': {empty} holds no records; expected")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": "b", "system": 5}\n')
    with pytest.raises(DataError) as e:
        load_prompts(str(bad), "grpo.prompt_file", template, "", 64)
    assert str(e.value) == f'{bad}:2: "system" must be a string, got int; fix or remove the line'


@pytest.mark.slow
def test_ppo_with_qlora_saves_the_dequantised_merged_policy(tmp_path, tiny_ckpt):
    sec = dict(SMALL, iterations=1, rollout_batch=8, minibatch_size=8, epochs=1, reward="digits",
               eval_examples=0)  # fmt: skip
    cfg = rl_config("ppo", tiny_ckpt, tmp_path / "q", **sec)
    cfg = replace(cfg, **{"peft.method": "lora", "peft.rank": 4, "quantize.method": "int4",
                          "quantize.group_size": 32})  # fmt: skip
    assert _run(ppo, cfg)["steps"] == 1  # it crashed here, saving: no float update on int weights
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    _, state, _, meta = load_checkpoint_model(tmp_path / "q/checkpoints", mesh)
    leaves = jax.tree.leaves(state)
    assert all(x.dtype == np.float32 for x in leaves)  # a plain float decoder, no int base
    assert (
        meta["config"]["quantize"]["method"] == "none"
        and meta["config"]["peft"]["method"] == "none"
    )


@pytest.mark.slow  # 15 s; the loop's preemption logic is fast in tests/training/test_loop.py
def test_grpo_sigterm_saves_the_iteration_and_the_rerun_goes_on(tmp_path, tiny_ckpt, monkeypatch):
    """A preemption notice during iteration 1 of 2 (no scheduled checkpoint before the last):
    the run saves iteration 1's resume state and stops; the same config goes on from it."""
    sent = []

    def reward(text, row):  # grpo's accuracy rule, called while iteration 1 is scored
        if not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))
        return 0.0

    monkeypatch.setattr(grpo, "arithmetic", reward)
    sec = dict(SMALL, prompts_per_iteration=2, group_size=4, minibatch_size=8, epochs=1)
    cfg = rl_config("grpo", tiny_ckpt, tmp_path / "g", **dict(sec, eval_examples=0))
    with pytest.raises(Preempted, match=r"after iteration 1: state saved to .*resume/1;"):
        _run(grpo, cfg)
    assert sorted(p.name for p in (tmp_path / "g/resume").iterdir()) == ["1"]
    assert [json.loads(x)["step"] for x in (tmp_path / "g/metrics.jsonl").open()] == [1]
    assert not (tmp_path / "g/checkpoints").exists()
    assert _run(grpo, cfg)["resumed_from_iteration"] == 1
