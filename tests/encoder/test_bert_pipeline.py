"""configs/tiny_bert.yaml through the CLI, shrunk: data → WordPiece → mlm → classify from the
pretrained encoder → classify from a random init of the same encoder, each stage handing its
outputs on."""

import json

import pytest

from jaxllm.main import main

from .conftest import ROOT, TINY_ENCODER
from .test_encoder_stages import sentiment_cut


@pytest.mark.slow  # ~60 s: five stages through the CLI
def test_tiny_bert_pipeline_few_steps(tmp_path):
    out = tmp_path / "bert"
    files = sentiment_cut(tmp_path, 16)
    sets = {
        "output_dir": out, "progress": "false",
        "pipeline.1.tokenizer.vocab_size": 1000,
        **{f"pipeline.2.model.{k}": v for k, v in TINY_ENCODER.items()},
        "pipeline.2.loader.seq_len": 32, "pipeline.2.loader.batch_size": 8,
        "pipeline.2.train.steps": 2, "pipeline.2.train.eval_batches": 1,
    }  # fmt: skip
    for i in (3, 4):
        sets.update({f"pipeline.{i}.{k}": v for k, v in files.items()})
        sets.update({f"pipeline.{i}.loader.seq_len": 32, f"pipeline.{i}.loader.batch_size": 8,
                     f"pipeline.{i}.train.steps": 2})  # fmt: skip
    args = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    assert main(["--config", str(ROOT / "configs/tiny_bert.yaml"), *args]) == 0
    mlm = json.loads((out / "3-tiny_mlm/summary.json").read_text())
    pre = json.loads((out / "4-tiny_classify/summary.json").read_text())
    rnd = json.loads((out / "5-tiny_classify_scratch/summary.json").read_text())
    assert mlm["steps"] == 2 and "val_nsp_accuracy_after" not in mlm  # mlm.nsp: false
    assert pre["init"] == "checkpoint" and rnd["init"] == "random"
    assert pre["examples"] == rnd["examples"] == {"train": 16, "val": 20, "test": 18}
    resolved = (out / "4-tiny_classify/config.yaml").read_text()
    assert str(out / "3-tiny_mlm/checkpoints") in resolved
    assert (
        "pooling: mean" in resolved
        and "pooling: mean" in (out / "5-tiny_classify_scratch/config.yaml").read_text()
    )  # the same head on both
    assert str(out / "2-tiny_wordpiece") in (out / "3-tiny_mlm/config.yaml").read_text()
    assert (out / "5-tiny_classify_scratch/predictions.jsonl").is_file()
