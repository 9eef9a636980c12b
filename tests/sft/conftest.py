"""Helpers for the SFT tests (the `tok` / `template` / `tiny_ckpt` fixtures live in
tests/conftest.py)."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
SFT_TRAIN = ROOT / "jaxllm" / "assets" / "sft" / "train.jsonl"


def sft_texts(limit: int = 2000) -> list[str]:
    rows = [json.loads(x) for x in SFT_TRAIN.read_text(encoding="utf-8").splitlines()[:limit]]
    return [f"<s>{r['prompt']}\n{r['response']}</s>" for r in rows]
