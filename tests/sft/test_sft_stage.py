"""`stage: sft` end to end: a tiny model pretrained for a few steps, then fine-tuned."""

import json
import shutil
from pathlib import Path

from jaxllm.config import from_dict, read_yaml
from jaxllm.main import main
from jaxllm.rundir import RunDir
from jaxllm.trainers import sft
from jaxllm.training.checkpoint import Checkpointer

from .conftest import ROOT, sft_texts

TINY = {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64}


def pretrain(tmp_path: Path, tok_path: Path) -> Path:
    data = tmp_path / "data"
    for split, texts in (("train", sft_texts(400)), ("val", sft_texts(40))):
        (data / split).mkdir(parents=True)
        rows = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
        (data / split / "shard-00000.jsonl").write_text(rows, encoding="utf-8")
    out = tmp_path / "pre"
    sets = {
        "output_dir": out, "progress": "false", "inputs.data_dir": data,
        "inputs.tokenizer": tok_path, "loader.seq_len": 64, "loader.batch_size": 8,
        "train.steps": 3, "train.eval_batches": 1,
        **{f"model.{k}": v for k, v in TINY.items()},
    }  # fmt: skip
    args = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    assert main(["--config", str(ROOT / "configs/tiny_pretrain.yaml"), *args]) == 0
    return out / "checkpoints"


def sft_config(ckpt: Path, out: Path):
    """configs/tiny_sft.yaml shrunk."""
    raw = read_yaml(ROOT / "configs/tiny_sft.yaml")
    raw["sft"] = {**raw.get("sft", {}), "eval_examples": 8, "eval_max_new_tokens": 6}
    raw.update(name="sft", output_dir=str(out), progress=False)
    raw["inputs"]["checkpoint"] = str(ckpt)
    raw["loader"] = {"seq_len": 64, "batch_size": 8}
    raw["train"].update(steps=4, eval_every=2, checkpoint_every=2, eval_batches=2)
    return from_dict(raw)


def run_sft(cfg) -> dict:
    run_dir = RunDir.open(cfg)
    return run_dir.finish(sft.run(cfg, run_dir))


def test_sft_stage_end_to_end_and_resume(tmp_path, tok, tiny_ckpt):
    ckpt = tiny_ckpt
    cfg = sft_config(ckpt, tmp_path / "sft")
    summary = run_sft(cfg)
    for key in ("val_loss", "exact_match"):
        assert isinstance(summary[f"{key}_before"], float)
        assert isinstance(summary[f"{key}_after"], float)
    assert 0.0 <= summary["exact_match_after"] <= 1.0
    assert summary["val_loss_after"] < summary["val_loss_before"]  # learning the format
    assert summary["steps"] == 4 and len(summary["samples_after"]) == 6
    assert set(summary["exact_match_by_task_after"]) <= {"bible", "poem", "math", "qa", "service"}
    assert summary["samples_after"][0]["prompt"].endswith("<|assistant|>")
    metrics = [json.loads(x) for x in (tmp_path / "sft/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "eval_loss" in m] == [2, 4]
    # the fine-tuned checkpoint carries what `load_checkpoint_model` needs (stage: generate)
    meta = Checkpointer(tmp_path / "sft/checkpoints", async_save=False).read_meta(4)
    assert meta["model"]["d_model"] == 32 and meta["tokenizer"] == str(
        tmp_path / "sft/tokenizer.model"
    )
    assert (
        tmp_path / "sft/tokenizer.model"
    ).read_bytes() == tok.path.read_bytes()  # kept in the run
    assert from_dict(meta["config"]).stage == "sft"
    # a crash after step 2: the resumed run starts there and reproduces steps 3-4 exactly
    shutil.rmtree(tmp_path / "sft/checkpoints/4")
    (tmp_path / "sft/summary.json").unlink()
    again = run_sft(cfg)
    assert again["resumed_from_step"] == 2
    assert again["final_train_loss"] == summary["final_train_loss"]
