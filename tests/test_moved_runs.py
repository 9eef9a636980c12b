"""Run directories can move: a tree of runs made from one working directory, moved elsewhere
and read from a third, still loads (tokenizer kept in each run, metadata paths relative to
the checkpoint, a LoRA run's base found beside it)."""

import json
import shutil
from pathlib import Path

import pytest

from jaxllm.config import from_dict, read_yaml, replace
from jaxllm.config.peft import PeftConfig
from jaxllm.trainers import run_stage
from jaxllm.trainers.hf_export import export_checkpoint
from tests.sft.test_sft_stage import ROOT, pretrain, run_sft, sft_config


def short_sft(ckpt: Path, out: Path, lora: bool = False):
    cfg = sft_config(ckpt, out)
    cfg = replace(cfg, train=replace(cfg.train, steps=2, eval_every=2, checkpoint_every=2))
    return replace(cfg, peft=PeftConfig("lora", rank=4, alpha=8.0)) if lora else cfg


def generate(ckpt: Path, out: Path) -> list[dict]:
    raw = read_yaml(ROOT / "configs/tiny_generate.yaml")
    raw.update(output_dir=str(out), progress=False)
    raw["inputs"]["checkpoint"] = str(ckpt)
    raw["generate"].update(prompts=["In the beginning"], max_new_tokens=4)
    run_stage(from_dict(raw))
    return [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]


def stored_meta(ckpt: Path, step: int) -> dict:
    return json.loads((ckpt / str(step) / "meta" / "metadata").read_text())


@pytest.mark.slow  # 19 s: a chain of real runs; path resolution stays fast below
def test_moved_run_tree_loads_from_another_cwd(tmp_path, tok, monkeypatch):
    made, moved, elsewhere = tmp_path / "made", tmp_path / "moved", tmp_path / "elsewhere"
    for d in (made, moved, elsewhere):
        d.mkdir()
    monkeypatch.chdir(made)  # every path below is relative to this cwd, as a user's would be
    (made / "runs/tok").mkdir(parents=True)
    shutil.copyfile(tok.path, made / "runs/tok/tokenizer.model")
    pre = pretrain(Path("runs"), Path("runs/tok/tokenizer.model"))
    run_sft(short_sft(pre, Path("runs/lora"), lora=True))
    lora_meta = stored_meta(Path("runs/lora/checkpoints"), 2)
    assert stored_meta(pre, 3)["tokenizer"] == "../tokenizer.model"  # the run's own copy
    assert lora_meta["base_checkpoint"] == "../../pre/checkpoints"

    shutil.move(made / "runs", moved / "runs")
    monkeypatch.chdir(elsewhere)
    pre, lora = moved / "runs/pre/checkpoints", moved / "runs/lora/checkpoints"
    assert len(generate(pre, elsewhere / "gen")) == 1
    assert len(generate(lora, elsewhere / "gen_lora")) == 1  # its base moved along
    summary = run_sft(short_sft(pre, elsewhere / "sft"))
    assert summary["steps"] == 2 and (elsewhere / "sft/tokenizer.model").is_file()
    out = export_checkpoint(lora, elsewhere / "hf")
    assert out["outputs"]["tokenizer"] == str(elsewhere / "hf/tokenizer.model")
    assert (elsewhere / "hf/tokenizer.model").read_bytes() == Path(tok.path).read_bytes()
    assert "tokenizer_note" not in out  # a tokenizer.json made from it comes along
    from transformers import AutoTokenizer

    text = "Hello there, 17 + 25 = 42."
    auto = AutoTokenizer.from_pretrained(str(elsewhere / "hf"))
    assert auto(text).input_ids == [tok.bos_id, *tok.encode(text)]
    written = json.loads((elsewhere / "hf/config.json").read_text())  # the tokenizer's ids
    context = written.get("max_position_embeddings", written.get("n_positions"))
    assert auto.model_max_length == context  # truncation=True cuts at the model's context
    assert (written["bos_token_id"], written["eos_token_id"]) == (tok.bos_id, tok.eos_id)
    gen = json.loads((elsewhere / "hf/generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.eos_id, tok.special_ids["<|end|>"]]


def test_resolve_paths_prefers_the_checkpoint_then_absolute_then_cwd(tmp_path, monkeypatch):
    from jaxllm.training.checkpoint import resolve_paths

    ckpt = tmp_path / "run/checkpoints"
    ckpt.mkdir(parents=True)
    (tmp_path / "run/tokenizer.model").write_text("t")
    (tmp_path / "elsewhere.model").write_text("t")
    new = {"tokenizer": "../tokenizer.model", "tokenizer_absolute": "/gone/tokenizer.model"}
    assert resolve_paths(new, ckpt)["tokenizer"] == str(tmp_path / "run/tokenizer.model")
    moved_away = {
        "tokenizer": "../nothing.model",
        "tokenizer_absolute": str(tmp_path / "elsewhere.model"),
    }
    assert resolve_paths(moved_away, ckpt)["tokenizer"] == str(tmp_path / "elsewhere.model")
    monkeypatch.chdir(tmp_path)  # an old checkpoint: a value relative to the cwd of its run
    assert resolve_paths({"tokenizer": "elsewhere.model"}, ckpt)["tokenizer"] == "elsewhere.model"
    missing = resolve_paths({"tokenizer": "../none.model", "tokenizer_absolute": "/x"}, ckpt)
    assert missing["tokenizer"] == str(tmp_path / "run/none.model")  # named in the error
