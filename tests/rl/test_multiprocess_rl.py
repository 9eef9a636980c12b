"""`stage: ppo` on two real processes × 4 CPU devices: each process samples its own rows of
the iteration's prompts, the rows join into global arrays (rewards, values, GAE, whitening,
minibatch steps), and the run's rewards, losses, KL and entropy equal one process × 8
devices'; only process 0 writes the run files; a pair killed after a checkpoint resumes to
the uninterrupted pair's figures. (The tiny model earns no rule reward; the entropy bonus
moves the policy, so the KL penalty, advantages, values and losses are non-zero.)"""

import json
from pathlib import Path

import numpy as np
import pytest

from jaxllm.main import main
from tests.multiprocess import Group, main_args, metrics

CONFIG = "configs/tiny_ppo.yaml"

pytestmark = pytest.mark.slow


def settings(ckpt: Path, out: Path, **extra) -> dict:
    return {
        "output_dir": out, "progress": "false", "inputs.checkpoint": ckpt,
        "inputs.reward_checkpoint": '""', "mesh.data": -1, "mesh.rules": "dp",
        "ppo.reward": "digits", "ppo.ent_coef": 0.05, "train.optim.lr": 1e-3, "ppo.iterations": 3, "ppo.rollout_batch": 16,
        "ppo.minibatch_size": 8, "ppo.epochs": 2, "ppo.max_new_tokens": 6,
        "ppo.eval_examples": 4, "ppo.eval_max_new_tokens": 4, "ppo.checkpoint_every": 1, **extra,
    }  # fmt: skip


def figures(run_dir: Path) -> list[dict]:
    timing = ("seconds", "per_s", "share")
    rows = {r["step"]: r for r in metrics(run_dir) if "loss" in r}  # a resumed run: the last
    return [
        {k: v for k, v in rows[s].items() if not any(t in k for t in timing)} for s in sorted(rows)
    ]


def close(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) == 3, (a, b)
    assert all(abs(r["loss"]) > 1e-4 and abs(r["kl"]) > 0 for r in a[1:]), a  # real updates
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        # clip fractions count elements past a threshold: one may flip on float noise
        frac = [k for k in ra if k.endswith("clip_frac")]
        np.testing.assert_allclose([ra[k] for k in frac], [rb[k] for k in frac], atol=0.02)
        rest = [k for k in ra if k not in frac]  # figures rounded to 6 decimals
        np.testing.assert_allclose(
            [ra[k] for k in rest], [rb[k] for k in rest], rtol=2e-4, atol=2e-6
        )


def test_two_processes_run_ppo_like_one_and_resume(tiny_ckpt, tmp_path):
    out = tmp_path / "two"
    group = Group(main_args(CONFIG, out, settings(tiny_ckpt, out)), tmp_path / "logs")
    group.wait(timeout=400)
    ref = tmp_path / "one"
    args = [x for k, v in settings(tiny_ckpt, ref).items() for x in ("--set", f"{k}={v}")]
    assert main(["--config", CONFIG, *args]) == 0
    close(figures(out), figures(ref))
    two, one = (json.loads((d / "summary.json").read_text()) for d in (out, ref))
    assert two["samples_after"] == one["samples_after"]  # greedy answers, sharded weights
    files = [
        {Path(w["path"]).parts[0] for w in group.writes(i) if w["path"] != "."}
        - {"checkpoints", "resume"}  # orbax: every process writes its shards
        for i in (0, 1)
    ]
    assert {"config.yaml", "summary.json", "metrics.jsonl"} <= files[0], files[0]
    assert files[1] == set(), files[1]

    killed = tmp_path / "killed"
    args = main_args(CONFIG, killed, settings(tiny_ckpt, killed))
    Group(args, tmp_path / "l1").kill_when(killed / "resume/1")
    assert not (killed / "summary.json").exists(), "the run finished before it was killed"
    outs = Group(args, tmp_path / "l2").wait(timeout=400)
    assert all("resumed from" in o for o in outs), outs[0][-2000:]
    close(figures(killed), figures(out))
