"""`stage: scaling` machinery with a tiny sweep: every run is a real pretrain with its size,
budget and schedule; the prediction is written before the held-out model trains; an
interrupted sweep reruns only what is missing."""

import json
import shutil

import pytest

from jaxllm.config import from_dict, load_config
from jaxllm.main import main
from tests.sft.conftest import ROOT


def sweep_args(tiny_ckpt, tok, out):
    data = tiny_ckpt.parent.parent / "data"
    sets = {
        "output_dir": out, "progress": "false", "inputs.data_dir": data, "inputs.tokenizer": tok.path,
        "scaling.layers": "[1, 2]", "scaling.aspect": 16, "scaling.head_dim": 16,
        "scaling.tokens": "[1024, 2048]", "scaling.holdout_layers": 3, "scaling.holdout_tokens": 1024,
        "scaling.bootstrap": 3, "scaling.eval_batches": 1,
        "scaling.base": ROOT / "configs/tiny_pretrain.yaml",
    }  # fmt: skip
    return ["--config", str(ROOT / "configs/tiny_scaling.yaml"),
            *[x for k, v in sets.items() for x in ("--set", f"{k}={v}")]]  # fmt: skip


@pytest.mark.slow  # six tiny pretrain runs and a rerun: ~1.5 min of CPU
def test_tiny_sweep_fits_predicts_and_resumes(tmp_path, tok, tiny_ckpt):
    out = tmp_path / "sweep"
    assert main(sweep_args(tiny_ckpt, tok, out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    runs = {r["name"]: r for r in summary["runs"]}
    assert set(runs) == {"L1_T1024", "L1_T2048", "L2_T1024", "L2_T2048"}
    base = load_config(ROOT / "configs/tiny_pretrain.yaml")
    per_step = base.loader.batch_size * base.loader.seq_len
    sub = from_dict(json.loads(json.dumps(_config(out / "runs/L2_T2048"))))
    assert sub.model.d_model == 32 and sub.model.n_layers == 2 and sub.model.n_heads == 2
    assert sub.train.steps == max(1, round(2048 / per_step))
    sweep = load_config(ROOT / "configs/tiny_scaling.yaml").scaling
    assert sub.train.optim.lr == sweep.lr * sweep.lr_width / 32  # the width rule
    assert sub.train.optim.schedule == "cosine" and sub.train.eval_every == sub.train.steps
    assert (
        runs["L2_T1024"]["N"] > runs["L1_T1024"]["N"]
        and runs["L1_T2048"]["D"] >= runs["L1_T1024"]["D"]
    )
    fit = summary["chinchilla"]
    assert set(fit) >= {"E", "A", "alpha", "B", "beta"} and len(summary["residuals"]) == 4
    pred = summary["prediction"]
    assert pred["name"] == "L3_T1024" and pred["measured"] > 0
    # every N is total parameters (the default), the compute unit 6 N D of that N
    assert summary["params"] == pred["params"] == "total" and "after_training" not in pred
    assert pred["N"] == pred["row"]["params"]
    smallest = min(6 * r["params"] * r["D"] for r in runs.values())
    if summary["compute_optimal"] is None:  # 4 tiny runs can give a degenerate fit
        assert min(fit["alpha"], fit["beta"]) <= 0
    else:
        assert summary["compute_optimal"][0]["C"] == pytest.approx(smallest)
    assert (out / "prediction.json").stat().st_mtime_ns < (
        out / "runs/L3_T1024/summary.json"
    ).stat().st_mtime_ns
    assert (out / "scaling.png").is_file()
    # interrupted: one run and the sweep's summary gone; only that run trains again
    kept = (out / "runs/L1_T1024/summary.json").stat().st_mtime_ns
    (out / "runs/L2_T2048/summary.json").unlink()
    (out / "summary.json").unlink()
    assert main(sweep_args(tiny_ckpt, tok, out)) == 0
    assert (out / "runs/L1_T1024/summary.json").stat().st_mtime_ns == kept
    assert (out / "runs/L2_T2048/summary.json").is_file()


def _config(run_dir):
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())


@pytest.mark.slow  # two sizes, each one trunk and two cooldowns: ~1 min of CPU
def test_wsd_sweep_trains_each_size_once_and_cools_down(tmp_path, tok, tiny_ckpt):
    out = tmp_path / "sweep"
    args = sweep_args(tiny_ckpt, tok, out) + [
        "--set", "scaling.schedule=wsd", "--set", "scaling.tokens=[8192, 16384, 32768]",
        "--set", "scaling.holdout_layers=0",
    ]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["schedule"] == "wsd" and "prediction" not in summary
    # 2048 tokens a step: 4, 8 and 16 steps; the cooldowns of round(0.2 * 4) = 1 and
    # round(0.2 * 8) = 2 steps leave the plateau at counts 4 and 7, and a branch trains at
    # least its last step: 1 + 1 steps besides each trunk's 16
    assert summary["sweep_steps"] == {"trained": 2 * (16 + 1 + 1), "from_scratch": 2 * 28}
    trunk = _config(out / "runs/L2_T32768")["train"]
    assert trunk["checkpoint_at"] == [3, 7] and trunk["optim"]["schedule"] == "wsd"
    for name, start in (("L2_T8192", 3), ("L2_T16384", 7), ("L1_T16384", 7)):
        run = json.loads((out / f"runs/{name}/summary.json").read_text())
        assert run["resumed_from_step"] == start, name
    assert len(summary["runs"]) == 6 and len(summary["residuals"]) == 6
    # a branch point's checkpoint lost (e.g. rotated out by a preemption's extra save): the
    # rerun trains that budget from scratch, the same run, and counts its steps
    before = json.loads((out / "runs/L2_T8192/summary.json").read_text())
    shutil.rmtree(out / "runs/L2_T32768/checkpoints/3")
    shutil.rmtree(out / "runs/L2_T8192")
    (out / "summary.json").unlink()
    assert main(args) == 0
    after = json.loads((out / "runs/L2_T8192/summary.json").read_text())
    assert after["resumed_from_step"] == 0 and after["val_loss"] == before["val_loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sweep_steps"] == {"trained": 2 * (16 + 1 + 1) + 3, "from_scratch": 2 * 28}
