"""`grpo.rewards` naming `model`: the reward model's score of each rollout row, weighted,
added to the rules; greedy evaluation scores texts the same way; a GRPO stage (online DPO)
trained on it end to end."""

import json
import math

import jax
import numpy as np
import pytest

from jaxllm.errors import ConfigError
from jaxllm.rundir import RunDir
from jaxllm.trainers import grpo, reward
from jaxllm.trainers.reward_model import load_reward_model, reward_scores
from jaxllm.trainers.rewards import digits
from jaxllm.trainers.rl_loop import setup_stage
from jaxllm.trainers.rollout import stop_ids
from jaxllm.training.state import to_global

from ..alignment.conftest import run_stage, stage_config
from .conftest import rl_config

TEXTS = [
    "It is 12.",
    "Happy to help!",
    "",
    "7 and 8, then 15",
    "12",
    "Sorry.",
    "3",
    "ok",
]  # 8: a row per device


@pytest.fixture(scope="module")
def reward_ckpt(tmp_path_factory, tiny_ckpt):
    """A tiny reward model: 2 steps of `stage: reward` (a trained, non-zero head)."""
    out = tmp_path_factory.mktemp("rm") / "rm"
    cfg = stage_config("reward", tiny_ckpt, out, reward={"val_file": ""},
                       train={"steps": 2, "eval_every": 0, "optim": {"lr": 1e-2}})  # fmt: skip
    return run_stage(reward, cfg)["outputs"]["reward_checkpoint"]


def _rows(st, texts, recs, seq_len):
    """prompt + text + <|end|> per row, right-padded: what the reward model reads."""
    end = stop_ids(st.template)[0]
    tokens = np.zeros((len(texts), seq_len), np.int32)
    seg = np.zeros_like(tokens)
    for i, (text, rec) in enumerate(zip(texts, recs)):
        ids = [*rec["ids"], *st.tok.encode(text, add_bos=False), end][:seq_len]
        tokens[i, : len(ids)], seg[i, : len(ids)] = ids, 1
    return {"tokens": tokens, "segment_ids": seg, "positions": np.arange(seq_len) * seg}


def test_model_reward_is_weighted_and_added_to_the_rules(tmp_path, tiny_ckpt, reward_ckpt):
    cfg = rl_config("grpo", tiny_ckpt, tmp_path / "g", rewards=["model", "digits"],
                    reward_weights=[0.5, 2.0], reward_checkpoint=reward_ckpt,
                    prompts_per_iteration=2, group_size=4, minibatch_size=8)  # fmt: skip
    st = setup_stage(cfg, "grpo", 2)
    rewards, scores = grpo.grpo_rewards(cfg, st)
    recs = st.rows[: len(TEXTS)]
    rows = _rows(st, TEXTS, recs, cfg.loader.seq_len)
    g, state = load_reward_model(reward_ckpt, st.mesh)[:2]
    model = np.asarray(reward_scores(g, state, rows["tokens"], rows["segment_ids"],
                                     rows["positions"]))  # fmt: skip
    assert np.ptp(model) > 0  # the texts score differently
    want = 0.5 * model + 2.0 * np.array([digits(t, r) for t, r in zip(TEXTS, recs)])
    np.testing.assert_allclose(scores(TEXTS, recs), want, rtol=1e-5, atol=1e-6)
    got = rewards(TEXTS, recs, to_global(rows, st.mesh))  # the training path: the rows
    np.testing.assert_allclose(np.asarray(jax.device_get(got)), want, rtol=1e-5, atol=1e-6)


def test_a_model_reward_needs_a_checkpoint(tmp_path, tiny_ckpt):
    cfg = rl_config("grpo", tiny_ckpt, tmp_path / "g", rewards=["model"], reward_weights=[1.0],
                    prompts_per_iteration=2, group_size=4, minibatch_size=8)  # fmt: skip
    st = setup_stage(cfg, "grpo", 2)
    with pytest.raises(ConfigError, match=r"'grpo.reward_checkpoint': a `model` reward needs"):
        grpo.grpo_rewards(cfg, st)
    with pytest.raises(ConfigError, match=r"'grpo.reward_checkpoint': x is read for a `model`"):
        rl_config("grpo", tiny_ckpt, tmp_path / "h", reward_checkpoint="x")


@pytest.mark.slow
def test_online_dpo_on_the_reward_model_runs(tmp_path, tiny_ckpt, reward_ckpt):
    cfg = rl_config("grpo", tiny_ckpt, tmp_path / "odpo", iterations=2, max_new_tokens=6,
                    eval_examples=4, eval_max_new_tokens=4, prompts_per_iteration=2,
                    group_size=4, minibatch_size=8, beta=0.0, advantage="online_dpo",
                    rewards=["model"], reward_weights=[1.0], reward_checkpoint=reward_ckpt)  # fmt: skip
    run_dir = RunDir.open(cfg)
    summary = run_dir.finish(grpo.run(cfg, run_dir))
    rows = [json.loads(x) for x in (tmp_path / "odpo/metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["reward"]) for r in rows)
    assert rows[0]["pair_fraction"] == 1.0  # a model's scores differ within every group
    assert "greedy_reward_before" in summary and "greedy_reward_after" in summary
