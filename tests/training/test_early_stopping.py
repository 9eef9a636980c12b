"""Early stopping and the best checkpoint (`train.early_stopping`, `train.keep_best`): the
tracker's rule, a run that stops and hands on its best weights, and a resumed run that stops
where the uninterrupted one did."""

import json
import shutil

import jax
import numpy as np
import pytest

from jaxllm.config import MeshConfig
from jaxllm.main import main
from jaxllm.sharding import make_mesh
from jaxllm.trainers.checkpoint_model import load_checkpoint_model
from jaxllm.training.loop import Watch
from tests.training.test_continued import args as pretrain_args


def test_watch_rule():
    w = Watch("loss", "min", patience=2, min_delta=0.1)
    assert not w.update(1, {"eval_loss": 3.0})
    assert not w.update(2, {"eval_loss": 2.95})  # better, but not by min_delta
    assert not w.update(3, {"eval_loss": 2.5}) and w.best_step == 3 and w.since == 0
    assert not w.update(4, {"eval_loss": 2.6})
    assert w.update(5, {"eval_loss": 2.45})  # 0.05 < min_delta: the second miss stops
    up = Watch("accuracy", "max", patience=1)
    assert not up.update(1, {"eval_accuracy": 0.5}) and up.update(2, {"eval_accuracy": 0.5})
    again = Watch("loss")
    again.load(w.state())
    assert (again.best_value, again.best_step, again.since) == (2.5, 3, 2)
    with pytest.raises(Exception, match="'perplexity' is not one of this stage's held-out figures"):
        Watch("perplexity").update(1, {"eval_loss": 1.0})


def test_stage_stops_keeps_best_and_resumes_to_the_same_stop(tmp_path, tiny_ckpt):
    out = tmp_path / "es"
    run = pretrain_args(
        tiny_ckpt, out, "train.steps=8", "train.eval_every=1", "train.checkpoint_every=1",
        "train.keep_checkpoints=10", "train.early_stopping.patience=2",
        "train.early_stopping.min_delta=100", "train.keep_best=true",
    )  # fmt: skip
    assert main(run) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early_at"] == 3 and summary["best_step"] == 1
    assert summary["outputs"]["checkpoint"] == str(out / "best")
    assert summary["tokens_seen"] == 8 * 64 * 3  # batch × seq_len × the 3 steps trained
    # the held-out figures are best/'s (step 1's evaluation), not the last state's (step 3)
    rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    assert summary["val_loss"] == pytest.approx(evals[1], abs=2e-6)
    assert summary["val_loss"] != pytest.approx(evals[3], abs=2e-6)
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    _, best, _, _ = load_checkpoint_model(out / "best", mesh)
    _, first, _, _ = load_checkpoint_model(out / "checkpoints", mesh, step=1)
    for a, b in zip(jax.tree.leaves(best), jax.tree.leaves(first)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a crash after step 2: the resumed run knows it missed once already, and stops at 3 again
    shutil.rmtree(out / "checkpoints/3")
    (out / "summary.json").unlink()
    assert main(run) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["stopped_early_at"] == 3 and again["resumed_from_step"] == 2
    # killed after the early stop's checkpoint, before its summary: the rerun trains no more
    # and reports the same figures
    (out / "summary.json").unlink()
    rows = (out / "metrics.jsonl").read_text()
    assert main(run) == 0
    last = json.loads((out / "summary.json").read_text())
    assert last["stopped_early_at"] == 3 and last["resumed_from_step"] == 3
    assert last["val_loss"] == pytest.approx(evals[1], abs=2e-6)
    for key in ("final_train_loss", "best_step", "best_value"):
        assert last[key] == again[key], key
    assert (out / "metrics.jsonl").read_text() == rows
    # killed before any regular checkpoint but after a best one: the rerun saves best again
    shutil.rmtree(out / "checkpoints")
    (out / "summary.json").unlink()
    assert main(run) == 0
    fresh = json.loads((out / "summary.json").read_text())
    assert fresh["stopped_early_at"] == 3 and fresh["best_step"] == 1
    assert fresh["final_train_loss"] == summary["final_train_loss"]
