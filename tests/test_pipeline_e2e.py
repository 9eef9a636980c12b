"""End to end through the CLI: the shipped pipeline's stages hand their outputs on."""

import json
from pathlib import Path

import pytest

from jaxllm.main import main

ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    return main(["--config", *args])


def two_stage(tmp_path) -> str:
    """data → tokenizer only (the shipped tiny.yaml goes on to pretrain and generate)."""
    p = tmp_path / "two.yaml"
    p.write_text(
        "stage: pipeline\nname: tiny\npipeline:\n"
        f"  - config: {ROOT / 'configs/tiny_data.yaml'}\n"
        f"  - {{config: {ROOT / 'configs/tiny_tokenizer.yaml'}, inputs.data_dir: ''}}\n"
    )
    return str(p)


def test_data_then_tokenizer_pipeline(tmp_path, capsys):
    out = tmp_path / "tiny"
    sets = [
        f"output_dir={out}",
        "progress=false",
        "pipeline.1.tokenizer.vocab_size=2000",
        "pipeline.1.tokenizer.character_coverage=0.98",
    ]
    cfg = two_stage(tmp_path)
    assert run(cfg, *[x for s in sets for x in ("--set", s)]) == 0
    data = json.loads((out / "1-tiny_data" / "summary.json").read_text())
    tok = json.loads((out / "2-tiny_tokenizer" / "summary.json").read_text())
    assert data["outputs"]["data_dir"] == str(out / "1-tiny_data")
    assert data["train_docs"] > 4000 and data["val_docs"] > 50
    assert (out / "1-tiny_data" / "data_report.json").is_file()
    n, total = map(int, tok["round_trip_exact"].split("/"))
    assert n == total == data["val_docs"]
    assert set(tok["tokens_per_char"]) >= {"kjv", "tang300"}
    pipe = json.loads((out / "summary.json").read_text())
    assert pipe["outputs"]["tokenizer"].endswith("tokenizer.model")
    # a finished pipeline is never overwritten silently
    capsys.readouterr()
    assert run(cfg, *[x for s in sets for x in ("--set", s)]) == 2
    assert "holds a finished run" in capsys.readouterr().err


def test_pipeline_resumes_skipping_finished_stages(tmp_path):
    out = tmp_path / "p"
    sets = [
        f"output_dir={out}",
        "progress=false",
        "pipeline.1.tokenizer.vocab_size=2000",
        "pipeline.1.tokenizer.character_coverage=0.98",
    ]
    args = [x for s in sets for x in ("--set", s)]
    cfg = two_stage(tmp_path)
    assert run(cfg, *args) == 0
    stamp = (out / "1-tiny_data" / "summary.json").stat().st_mtime_ns
    # simulate a crash in the last stage: it has no summary, the pipeline neither
    (out / "2-tiny_tokenizer" / "summary.json").unlink()
    (out / "summary.json").unlink()
    assert run(cfg, *args) == 0
    assert (out / "1-tiny_data" / "summary.json").stat().st_mtime_ns == stamp  # not rerun
    assert (out / "2-tiny_tokenizer" / "summary.json").is_file()


@pytest.mark.parametrize("mode", ["skip", "fail"])
def test_bad_input_through_the_cli(tmp_path, capsys, mode):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "<s>a perfectly fine document here</s>"}\n{"text": \n')
    cfg = tmp_path / "d.yaml"
    cfg.write_text(
        f"stage: data\noutput_dir: {tmp_path / 'out'}\nprogress: false\n"
        f"data: {{sources: [{{path: {src}}}], on_error: {mode}, val_fraction: 0.0}}\n"
    )
    code = run(str(cfg))
    err = capsys.readouterr().err
    if mode == "fail":
        assert code == 2 and f"{src}:2:" in err and err.count("\n") == 1
    else:
        assert code == 0
        report = json.loads((tmp_path / "out" / "data_report.json").read_text())
        assert any(f"{src}:2" in e for e in map(str, report["errors"]["examples"]))


def test_whole_tiny_pipeline_few_steps(tmp_path):
    """The `make demo` pipeline, shrunk: every stage runs and hands its outputs on."""
    out = tmp_path / "tiny"
    sets = {
        "output_dir": out,
        "progress": "false",
        "pipeline.1.tokenizer.vocab_size": 1000,
        "pipeline.1.tokenizer.character_coverage": 0.98,
        "pipeline.2.model.d_model": 32,
        "pipeline.2.model.n_layers": 1,
        "pipeline.2.model.d_ff": 64,
        "pipeline.2.loader.batch_size": 8,
        "pipeline.2.loader.seq_len": 32,
        "pipeline.2.train.steps": 4,
        "pipeline.2.train.eval_batches": 2,
        "pipeline.3.generate.max_new_tokens": 5,
        "pipeline.4.loader.batch_size": 8,
        "pipeline.4.loader.seq_len": 64,
        "pipeline.4.train.steps": 2,
        "pipeline.4.sft.eval_examples": 4,
        "pipeline.4.sft.eval_max_new_tokens": 4,
        "pipeline.5.loader.batch_size": 8,
        "pipeline.5.loader.seq_len": 64,
        "pipeline.5.train.steps": 2,
        "pipeline.5.sft.eval_examples": 4,
        "pipeline.5.sft.eval_max_new_tokens": 4,
        "pipeline.6.loader.batch_size": 8,
        "pipeline.6.train.steps": 2,
        "pipeline.7.ppo.iterations": 1,
        "pipeline.7.ppo.rollout_batch": 16,
        "pipeline.7.ppo.minibatch_size": 8,
        "pipeline.7.ppo.eval_examples": 8,
        "pipeline.7.ppo.max_new_tokens": 8,
        "pipeline.7.ppo.eval_max_new_tokens": 8,
    }
    args = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    assert run(str(ROOT / "configs/tiny.yaml"), *args) == 0
    pre = json.loads((out / "3-tiny_pretrain" / "summary.json").read_text())
    assert pre["steps"] == 4 and pre["val_loss"] > 0 and pre["unigram_val_loss"] > 0
    gen = json.loads((out / "4-tiny_generate" / "summary.json").read_text())
    assert gen["checkpoint_step"] == 4 and len(gen["samples"]) == 5
    lines = (out / "4-tiny_generate" / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 5 and all("completion" in json.loads(x) for x in lines)
    # sft → sft on service → reward → ppo: the reward model goes on as `reward_checkpoint`, the
    # policy is the service SFT model, which trained on the service records only
    sft = json.loads((out / "5-tiny_sft" / "summary.json").read_text())
    svc = json.loads((out / "6-tiny_sft_service" / "summary.json").read_text())
    rm = json.loads((out / "7-tiny_reward" / "summary.json").read_text())
    ppo = json.loads((out / "8-tiny_ppo" / "summary.json").read_text())
    assert sft["val_loss_after"] > 0 and "pair_accuracy_after" in rm
    assert set(svc["exact_match_by_task_after"]) == {"service"}
    assert set(rm["outputs"]) == {"reward_checkpoint", "tokenizer"}
    assert ppo["iterations"] == 1 and ppo["final_logprob_gap"] < 1e-4
    answers = (out / "8-tiny_ppo" / "heldout_answers.jsonl").read_text().splitlines()
    assert len(answers) == 8 and ppo["outputs"]["heldout_answers"].endswith("answers.jsonl")
    resolved = (out / "8-tiny_ppo" / "config.yaml").read_text()
    assert str(out / "6-tiny_sft_service" / "checkpoints") in resolved
    assert str(out / "7-tiny_reward" / "checkpoints") in resolved
