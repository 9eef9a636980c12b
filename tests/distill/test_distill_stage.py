"""`stage: distill` end to end with tiny models: white-box (distilled student + baseline,
both validation losses and the teacher's in the summary; the student's checkpoint loads as a
plain decoder) and black-box (the teacher's answers are valid SFT records, handed to sft)."""

import dataclasses
import json
import os
import signal
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxllm.config import MeshConfig, from_dict, read_yaml
from jaxllm.data.sft import SFTRecords
from jaxllm.errors import ConfigError
from jaxllm.rundir import RunDir
from jaxllm.sharding import make_mesh
from jaxllm.trainers import distill
from jaxllm.trainers.lm import load_checkpoint_model
from jaxllm.trainers.pipeline import fill_inputs
from jaxllm.training.preemption import Preempted
from tests.sft.conftest import ROOT

STUDENT = {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32, "max_seq_len": 128}


@pytest.fixture(scope="module")
def teacher(tiny_ckpt) -> Path:
    """A d32 1-layer model pretrained a few steps (and its data dir next to it)."""
    return tiny_ckpt


def run(raw: dict) -> dict:
    cfg = from_dict(raw)
    run_dir = RunDir.open(cfg)
    return run_dir.finish(distill.run(cfg, run_dir))


def white_box_raw(teacher: Path, out: Path, **model) -> dict:
    raw = read_yaml(ROOT / "configs/tiny_distill.yaml")
    raw.update(name="distill", output_dir=str(out), progress=False)
    raw["inputs"].update(checkpoint=str(teacher), data_dir=str(teacher.parent.parent / "data"))
    raw["model"].update({**STUDENT, **model})
    raw["loader"] = {"seq_len": 64, "batch_size": 8}
    raw["train"].update(steps=3, checkpoint_every=3, eval_batches=1, log_every=1)
    return raw


def test_white_box_stage(tmp_path, teacher, tok):
    raw = white_box_raw(teacher, tmp_path / "wb")
    raw["train"].update(keep_best=True, eval_every=3)  # best/ is handed on: the student's
    summary = run(raw)
    for key in ("val_loss_distilled", "val_loss_baseline", "val_loss_teacher"):
        assert isinstance(summary[key], float) and summary[key] > 0
    assert summary["student_params"] < summary["teacher_params"]
    assert summary["distill_gain"] == pytest.approx(
        summary["val_loss_baseline"] - summary["val_loss_distilled"], abs=2e-4
    )
    assert (tmp_path / "wb/baseline/metrics.jsonl").is_file()
    metrics = [json.loads(x) for x in (tmp_path / "wb/metrics.jsonl").read_text().splitlines()]
    assert any("kl" in m for m in metrics)
    # the student's checkpoint is a plain decoder checkpoint (generate / sft load it by path);
    # with keep_best it is best/, the distilled student's (the baseline writes none there)
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    assert summary["outputs"]["checkpoint"] == str(tmp_path / "wb/best")
    _, best, m, meta = load_checkpoint_model(Path(summary["outputs"]["checkpoint"]), mesh)
    assert m.d_model == 16 and m.vocab_size == tok.vocab_size
    _, last, _, _ = load_checkpoint_model(tmp_path / "wb/checkpoints", mesh)
    assert summary["best_step"] == 3  # the only evaluation: best/3 is checkpoints/3
    jax.tree.map(np.testing.assert_array_equal, best, last)
    assert meta["tokenizer"] == str(tmp_path / "wb/tokenizer.model")  # the run's own copy
    assert (tmp_path / "wb/tokenizer.model").read_bytes() == tok.path.read_bytes()


def test_white_box_vocab_mismatch_is_one_clear_error(tmp_path, teacher, tok):
    with pytest.raises(ConfigError, match="model.vocab_size.*teacher"):
        run(white_box_raw(teacher, tmp_path / "bad", vocab_size=tok.vocab_size + 32))


def test_black_box_writes_sft_records_for_the_next_stage(tmp_path, teacher):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"What is {i} + {i}?", "response": str(2 * i), "task": "math"}
            for i in range(5)]  # fmt: skip
    rows.append({"messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Name a colour."}]})  # fmt: skip
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    raw = read_yaml(ROOT / "configs/tiny_teacher_answers.yaml")
    raw.update(name="ta", output_dir=str(tmp_path / "ta"), progress=False)
    raw["inputs"]["checkpoint"] = str(teacher)
    raw["distill"].update(
        prompts_file=str(prompts), val_prompts_file=str(prompts), max_prompts=4,
        max_new_tokens=6, batch_size=4, sample_temperature=1.0,
        keep_truncated=True,  # the pretrained-only teacher rarely stops within 6 tokens
    )  # fmt: skip
    summary = run(raw)
    out = summary["outputs"]
    train = SFTRecords([out["sft_data"]])
    val = SFTRecords([out["sft_val_data"]])
    assert len(train) == summary["answers_train"] <= 4
    assert summary["dropped_truncated_train"] == 0
    assert summary["answers_train"] + summary["empty_answers_train"] == 4
    assert len(val) == summary["answers_val"] and summary["answers_val"] >= 1
    for i in range(len(val)):  # every record parses as a conversation ending in an answer
        assert val[i][-1]["role"] == "assistant" and val[i][-1]["content"].strip()
    assert 0.0 <= summary["teacher_exact_match_val"] <= 1.0
    # a following sft stage in a pipeline receives the files as inputs.sft_data / sft_val_data
    sft_cfg = from_dict(read_yaml(ROOT / "configs/tiny_sft.yaml"))
    filled = fill_inputs(sft_cfg, out)
    assert filled.inputs.sft_data == out["sft_data"]
    assert filled.inputs.sft_val_data == out["sft_val_data"]


@pytest.fixture(scope="module")
def uninterrupted(teacher, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("full") / "run"
    return run(white_box_raw(teacher, out)), out


@pytest.mark.parametrize(
    "where, message",
    [("baseline", r"after step 2: checkpoint .*baseline/checkpoints/2"),
     pytest.param("student", r"after the stage before it finished: the baseline student not "
                  "started", marks=pytest.mark.slow)],  # the deferral: fast in test_loop.py
)  # fmt: skip
def test_preempted_baseline_resumes_from_its_checkpoint(
    tmp_path, teacher, monkeypatch, uninterrupted, where, message
):
    """The baseline trains after the student, in the same run: a SIGTERM in the baseline's
    step 2 saves that step; one in the student's last step lets the student finish, and the
    baseline does not start. Either way the rerun gives the uninterrupted run's figures."""
    full, full_dir = uninterrupted
    real = distill.run_loop

    def run_loop(spec, state, ckpt, run_dir):
        if spec.desc.startswith("baseline") == (where == "baseline"):
            step_fn, at = spec.step_fn, 1 if where == "baseline" else spec.total_steps - 1

            def step(s, b):
                if int(s.step) == at:  # the notice arrives in step at + 1
                    os.kill(os.getpid(), signal.SIGTERM)
                return step_fn(s, b)

            spec = dataclasses.replace(spec, step_fn=step)
        return real(spec, state, ckpt, run_dir)

    raw = white_box_raw(teacher, tmp_path / "cut")
    with monkeypatch.context() as m:
        m.setattr(distill, "run_loop", run_loop)
        with pytest.raises(Preempted, match=message):
            run(raw)
    again = run(raw)
    for key in ("val_loss_baseline", "final_train_loss_baseline", "val_loss_distilled"):
        assert again[key] == full[key], key

    def losses(d):
        lines = (d / "baseline/metrics.jsonl").read_text().splitlines()
        return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in map(json.loads, lines)]

    assert losses(tmp_path / "cut") == losses(full_dir)
