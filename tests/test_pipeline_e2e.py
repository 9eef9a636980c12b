"""End to end through the CLI: the shipped pipeline's stages hand their outputs on."""

import json

import pytest

from jaxllm.main import main


def run(*args):
    return main(["--config", *args])


def test_data_then_tokenizer_pipeline(tmp_path, capsys):
    out = tmp_path / "tiny"
    sets = [
        f"output_dir={out}",
        "progress=false",
        "pipeline.1.tokenizer.vocab_size=2000",
        "pipeline.1.tokenizer.character_coverage=0.98",
    ]
    assert run("configs/tiny.yaml", *[x for s in sets for x in ("--set", s)]) == 0
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
    assert run("configs/tiny.yaml", *[x for s in sets for x in ("--set", s)]) == 2
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
    assert run("configs/tiny.yaml", *args) == 0
    stamp = (out / "1-tiny_data" / "summary.json").stat().st_mtime_ns
    # simulate a crash in the last stage: it has no summary, the pipeline neither
    (out / "2-tiny_tokenizer" / "summary.json").unlink()
    (out / "summary.json").unlink()
    assert run("configs/tiny.yaml", *args) == 0
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
