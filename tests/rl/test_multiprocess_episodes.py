"""Multi-turn `grpo.env` episodes on two real processes × 4 CPU devices: each process plays
its own rows, and only the unfinished episodes are sampled each turn, yet every episode draws
by its global row (`Sampler`'s `row_ids`), so the run's rewards, losses and KL equal one
process × 8 devices', and a two-process run killed after a checkpoint resumes on ONE
process to the same figures."""

from pathlib import Path

import pytest

from jaxllm.trainers.envs import ENVS
from tests.multiprocess import Group
from tests.rl.env_worker import EveryWordEnv
from tests.rl.test_multiprocess_rl import close, figures

CONFIG = "configs/tiny_grpo_tool.yaml"
WORKER = "tests.rl.env_worker"  # jaxllm.main with the every_word env

pytestmark = pytest.mark.slow


def args(ckpt: Path, out: Path) -> list[str]:
    sets = {
        "output_dir": out, "progress": "false", "inputs.checkpoint": ckpt,
        "mesh.data": -1, "grpo.env": "every_word", "grpo.max_turns": 3, "grpo.iterations": 3,
        "grpo.prompts_per_iteration": 4, "grpo.group_size": 4, "grpo.minibatch_size": 8,
        "grpo.max_new_tokens": 6, "grpo.eval_examples": 0, "grpo.checkpoint_every": 1,
        "grpo.beta": 0.1, "train.optim.lr": 1e-3,
    }  # fmt: skip
    return ["--config", CONFIG, *(x for k, v in sets.items() for x in ("--set", f"{k}={v}"))]


def test_two_process_episodes_draw_like_one_and_resume_on_one(tiny_ckpt, tmp_path, monkeypatch):
    from jaxllm.main import main

    two = tmp_path / "two"
    Group(args(tiny_ckpt, two), tmp_path / "logs", module=WORKER).wait(timeout=400)
    monkeypatch.setitem(ENVS, "every_word", EveryWordEnv)
    one = tmp_path / "one"
    assert main(args(tiny_ckpt, one)) == 0
    assert all(r["reward"] > 1.0 for r in figures(one))  # several turns: env reward 1 each
    close(figures(two), figures(one))

    killed = tmp_path / "killed"
    Group(args(tiny_ckpt, killed), tmp_path / "l1", module=WORKER).kill_when(killed / "resume/1")
    assert not (killed / "summary.json").exists(), "the run finished before it was killed"
    assert main(args(tiny_ckpt, killed)) == 0  # resumed on one process
    close(figures(killed), figures(one))
