"""Bad input to the encoder stages, through the CLI: one line naming file:line or the key,
exit code 2, and nothing half-written (no checkpoint, prediction or summary)."""

import json
from pathlib import Path

import jax.numpy as jnp
import pytest

from jaxllm.config import from_dict, to_dict
from jaxllm.main import main
from jaxllm.training.checkpoint import Checkpointer

from .conftest import ROOT, TINY_ENCODER


def cli(capsys, config: str, sets: dict) -> str:
    """Runs the CLI; returns its stderr after checking it failed with exit code 2."""
    args = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    capsys.readouterr()
    assert main(["--config", str(ROOT / "configs" / config), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def nothing_written(out: Path) -> None:
    assert not (out / "summary.json").exists() and not (out / "checkpoints").exists()
    assert not (out / "predictions.jsonl").exists()


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"text": "一般", "label": "neutral"}, "train.jsonl:3: label 'neutral' is not one of"),
        ({"text": "", "label": "positive"}, "train.jsonl:3: empty 'text'"),
    ],
)
def test_classify_bad_records(capsys, tmp_path, bad, message):
    rows = [{"text": "好书", "label": "positive"}, {"text": "太差", "label": "negative"}, bad]
    out = tmp_path / "out"
    sets = {"output_dir": out, "progress": "false",
            "inputs.checkpoint": tmp_path / "never_read",
            "classify.train_file": write_jsonl(tmp_path / "train.jsonl", rows)}  # fmt: skip
    assert message in cli(capsys, "tiny_classify.yaml", sets)
    nothing_written(out)


def test_classify_pair_file_without_text_pair(capsys, tmp_path):
    pair = {"text": "a", "text_pair": "b", "label": "positive"}
    out = tmp_path / "out"
    sets = {"output_dir": out, "progress": "false",
            "inputs.checkpoint": tmp_path / "never_read",
            "classify.train_file": write_jsonl(tmp_path / "train.jsonl", [pair, pair]),
            "classify.val_file": write_jsonl(tmp_path / "val.jsonl", [pair, {"text": "c", "label": "negative"}])}  # fmt: skip
    err = cli(capsys, "tiny_classify.yaml", sets)
    assert "val.jsonl:2: record has no 'text_pair'" in err
    nothing_written(out)


def test_a_sentencepiece_tokenizer_is_refused_by_the_encoder_stages(capsys, tmp_path, tok,
                                                                    enc_data):  # fmt: skip
    out = tmp_path / "mlm"
    sets = {"output_dir": out, "progress": "false", "inputs.data_dir": enc_data,
            "inputs.tokenizer": tok.path}  # fmt: skip
    err = cli(capsys, "tiny_mlm.yaml", sets)
    assert "config key 'inputs.tokenizer'" in err and "WordPiece" in err
    nothing_written(out)
    out = tmp_path / "cls"
    err = cli(capsys, "tiny_classify.yaml", {"output_dir": out, "progress": "false",
                                             "inputs.checkpoint": fake_checkpoint(tmp_path / "enc", "mlm"),
                                             "inputs.tokenizer": tok.path})  # fmt: skip
    assert "config key 'inputs.tokenizer'" in err and "WordPiece" in err
    nothing_written(out)


def fake_checkpoint(path: Path, stage: str) -> Path:
    """A real orbax checkpoint (one dummy weight) whose metadata says `stage` wrote it: a
    pretrained decoder, or an encoder for `mlm`. The stages refuse it on its metadata."""
    model = {"preset": "bert_tiny", **TINY_ENCODER} if stage == "mlm" else {"preset": "tiny"}
    cfg = from_dict({"stage": stage, "model": {**model, "vocab_size": 64}})
    ckpt = Checkpointer(path, async_save=False)
    ckpt.save(1, {"params": {"w": jnp.zeros(2)}}, {"config": to_dict(cfg),
                                                   "model": to_dict(cfg.model)})  # fmt: skip
    ckpt.close()
    return path


def test_a_decoder_checkpoint_is_refused_by_the_encoder_stages(capsys, tmp_path, wp_tok,
                                                               enc_data):  # fmt: skip
    ckpt = fake_checkpoint(tmp_path / "dec", "pretrain")
    for config, extra in (("tiny_classify.yaml", {}),
                          ("tiny_mlm.yaml", {"inputs.data_dir": enc_data,
                                             "inputs.tokenizer": wp_tok.path})):  # fmt: skip
        out = tmp_path / config
        err = cli(capsys, config, {"output_dir": out, "progress": "false",
                                   "inputs.checkpoint": ckpt, **extra})  # fmt: skip
        assert f"{ckpt}/1: holds a decoder (model.arch: decoder" in err
        assert "this stage runs an encoder" in err
        nothing_written(out)


def test_an_encoder_checkpoint_is_refused_by_the_decoder_stages(capsys, tmp_path, tok, enc_data):
    ckpt = fake_checkpoint(tmp_path / "enc", "mlm")
    continued = {"inputs.data_dir": enc_data, "inputs.tokenizer": tok.path}
    for config, extra in (("tiny_sft.yaml", {}), ("tiny_generate.yaml", {}),
                          ("tiny_pretrain.yaml", continued)):  # fmt: skip
        out = tmp_path / config
        err = cli(capsys, config, {"output_dir": out, "progress": "false",
                                   "inputs.checkpoint": ckpt, **extra})  # fmt: skip
        assert "holds an encoder (model.arch: encoder, written by stage mlm)" in err
        assert "and this stage runs a decoder" in err
        nothing_written(out)
    # and pretrain with an encoder preset: the key is named before anything is built
    out = tmp_path / "pre"
    err = cli(capsys, "tiny_pretrain.yaml", {
        "output_dir": out, "progress": "false", "inputs.data_dir": enc_data,
        "inputs.tokenizer": tok.path, "model.preset": "bert_tiny",
        **{f"model.{k}": v for k, v in TINY_ENCODER.items()},
    })  # fmt: skip
    assert "config key 'model.arch': encoder (preset bert_tiny)" in err
    nothing_written(out)


def test_scan_layers_is_refused_for_encoders(capsys, tmp_path, wp_tok, enc_data):
    out = tmp_path / "mlm"
    sets = {"output_dir": out, "progress": "false", "inputs.data_dir": enc_data,
            "inputs.tokenizer": wp_tok.path, "model.scan_layers": "true"}  # fmt: skip
    err = cli(capsys, "tiny_mlm.yaml", sets)
    assert "config key 'model.scan_layers': encoders (arch: encoder) run their blocks" in err
    nothing_written(out)
