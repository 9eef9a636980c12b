"""`stage: sft` on two real processes × 4 CPU devices (fsdp × tensor mesh): the same losses
and greedy answers as one process × 8 devices reading the same global batches, only process
0 writes the run files, and a pair killed after a checkpoint resumes to the uninterrupted
pair's losses; `stage: generate` on two processes writes the one process's generations once."""

import json
from pathlib import Path

import numpy as np
import pytest

from jaxllm.main import main
from jaxllm.trainers import sft
from tests.multiprocess import Group, as_if_processes, main_args, series

CONFIG = "configs/tiny_sft.yaml"

pytestmark = pytest.mark.slow


def settings(ckpt: Path, out: Path, **extra) -> dict:
    return {
        "output_dir": out, "progress": "false", "inputs.checkpoint": ckpt,
        "loader.seq_len": 64, "loader.batch_size": 8,
        "mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2, "mesh.rules": "fsdp_tp",
        "train.steps": 4, "train.log_every": 1, "train.eval_every": 2,
        "train.checkpoint_every": 2, "train.eval_batches": 3, "train.keep_checkpoints": 3,
        "train.optim.warmup_steps": 1, "sft.eval_examples": 4, "sft.eval_max_new_tokens": 4,
        "sft.eval_batch_size": 4, **extra,
    }  # fmt: skip


def run_files(writes: list[dict]) -> set[str]:
    return {Path(w["path"]).parts[0] for w in writes if w["path"] != "."} - {"checkpoints"}


def test_two_processes_fine_tune_like_one(tiny_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "two"
    group = Group(main_args(CONFIG, out, settings(tiny_ckpt, out)), tmp_path / "logs")
    group.wait(timeout=300)
    ref = tmp_path / "one"
    for name in ("make_sft_dataset", "make_sft_eval_dataset"):
        monkeypatch.setattr(sft, name, as_if_processes(getattr(sft, name), 2))
    args = [x for k, v in settings(tiny_ckpt, ref).items() for x in ("--set", f"{k}={v}")]
    assert main(["--config", CONFIG, *args]) == 0
    for key in ("loss", "eval_loss"):
        a, b = series(out, key), series(ref, key)
        assert sorted(a) == sorted(b) and a
        np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(b)], rtol=2e-5)
    two, one = (json.loads((d / "summary.json").read_text()) for d in (out, ref))
    for key in ("val_loss_before", "val_loss_after"):
        assert two[key] == pytest.approx(one[key], rel=1e-4)
    assert two["samples_after"] == one["samples_after"]  # greedy answers on sharded weights
    mine, theirs = run_files(group.writes(0)), run_files(group.writes(1))
    assert {"config.yaml", "summary.json", "metrics.jsonl", "loss.png"} <= mine, mine
    assert theirs == set(), theirs


def test_two_processes_killed_together_resume_exactly(tiny_ckpt, tmp_path):
    sets = {"train.steps": 40, "train.checkpoint_every": 5, "train.eval_every": 20}
    full, killed = tmp_path / "full", tmp_path / "killed"
    Group(main_args(CONFIG, full, settings(tiny_ckpt, full, **sets)), tmp_path / "l0").wait()
    args = main_args(CONFIG, killed, settings(tiny_ckpt, killed, **sets))
    Group(args, tmp_path / "l1").kill_when(killed / "checkpoints/10")
    assert not (killed / "summary.json").exists(), "the run finished before it was killed"
    outs = Group(args, tmp_path / "l2").wait()
    assert all("resumed from" in o for o in outs)
    assert 10 <= json.loads((killed / "summary.json").read_text())["resumed_from_step"] < 40
    for key in ("loss", "eval_loss"):
        a, b = series(full, key), series(killed, key)
        assert sorted(a) == sorted(b)
        np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-6)


def test_generate_on_two_processes_writes_once(tiny_ckpt, tmp_path):
    sets = {"progress": "false", "inputs.checkpoint": tiny_ckpt, "generate.max_new_tokens": 6}
    out, ref = tmp_path / "two", tmp_path / "one"
    group = Group(main_args("configs/tiny_generate.yaml", out, {"output_dir": out, **sets}),
                  tmp_path / "logs")  # fmt: skip
    group.wait(timeout=240)
    args = [x for k, v in {"output_dir": ref, **sets}.items() for x in ("--set", f"{k}={v}")]
    assert main(["--config", "configs/tiny_generate.yaml", *args]) == 0
    assert (out / "generations.jsonl").read_text() == (ref / "generations.jsonl").read_text()
    assert "generations.jsonl" in run_files(group.writes(0))
    assert run_files(group.writes(1)) == set()
