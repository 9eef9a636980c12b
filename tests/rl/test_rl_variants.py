"""`stage: grpo` with the registries' other choices, end to end on the tiny model: DAPO's
pieces with truncated IS and Dr. GRPO's constant normaliser, and GSPO (a mean over responses:
it refuses the constant token normaliser) with RLOO; `stage: ppo` with truncated IS."""

import json
import math

import pytest

from jaxllm.rundir import RunDir
from jaxllm.trainers import grpo, ppo

from .conftest import rl_config

SMALL = dict(iterations=2, max_new_tokens=6, eval_examples=0, prompts_per_iteration=2,
             group_size=4, minibatch_size=8, beta=0.05, epochs=1)  # fmt: skip
VARIANTS = {
    "dapo": dict(
        loss="dapo",
        clip_eps_high=0.28,
        dynamic_sampling=True,
        overlong_buffer=2,
        tis_cap=2.0,
        loss_norm="constant",
        rewards=["digits"],
        reward_weights=[1.0],
    ),
    "gspo_rloo": dict(
        loss="gspo",
        clip_eps=3e-4,
        clip_eps_high=4e-4,
        advantage="rloo",
        rewards=["digits"],
        reward_weights=[1.0],
    ),
}

pytestmark = pytest.mark.slow  # end-to-end runs; the registry tests cover the math


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_grpo_variant_runs(tmp_path, tiny_ckpt, name):
    cfg = rl_config("grpo", tiny_ckpt, tmp_path / name, **SMALL, **VARIANTS[name])
    run_dir = RunDir.open(cfg)
    summary = run_dir.finish(grpo.run(cfg, run_dir))
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and summary["steps"] == 2
    for r in rows:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
    if name == "dapo":
        assert all(0 <= r["kept_fraction"] <= 1 for r in rows)
        # the in-process sampler agrees with the learner: the IS weights are ~1, none cut
        assert all(abs(r["tis_weight"] - 1) < 1e-3 and r["tis_truncated"] == 0 for r in rows)
    else:
        assert "tis_weight" not in rows[0] and "kept_fraction" not in rows[0]


def test_ppo_with_tis_runs(tmp_path, tiny_ckpt):
    sec = dict(iterations=2, max_new_tokens=6, eval_examples=0, rollout_batch=8,
               minibatch_size=8, epochs=1, reward="digits", tis_cap=2.0)  # fmt: skip
    cfg = rl_config("ppo", tiny_ckpt, tmp_path / "ppo", **sec)
    run_dir = RunDir.open(cfg)
    run_dir.finish(ppo.run(cfg, run_dir))
    rows = [json.loads(x) for x in (tmp_path / "ppo/metrics.jsonl").read_text().splitlines()]
    assert all(abs(r["tis_weight"] - 1) < 1e-3 and r["tis_truncated"] == 0 for r in rows)
