"""Shared fixtures for the data tests: a small tokenizer with the chat and trace tokens."""

import json
from pathlib import Path

import pytest

from jaxllm.config import TokenizerConfig
from jaxllm.tokenizer import Tokenizer, train_tokenizer
from jaxllm.tokenizer.chat import ChatTemplate

ASSETS = Path(__file__).resolve().parent.parent.parent / "jaxllm" / "assets"


def asset_texts(limit: int = 600) -> list[str]:
    """Prompt and answer texts of the shipped preference and SFT sets."""
    texts = []
    for name in ("preference/train.jsonl", "sft/train.jsonl"):
        lines = (ASSETS / name).read_text(encoding="utf-8").splitlines()[:limit]
        for r in map(json.loads, lines):
            answers = r.get("responses") or [r.get("chosen", ""), r.get("response", "")]
            texts.append("<s>" + "\n".join([r["prompt"], *answers]) + "</s>")
    return texts


@pytest.fixture(scope="session")
def pref_tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    cfg = TokenizerConfig(vocab_size=1000, character_coverage=0.98)
    path = train_tokenizer(asset_texts(), cfg, tmp_path_factory.mktemp("pref_tok") / "tokenizer")
    return Tokenizer.load(path)


@pytest.fixture(scope="session")
def pref_template(pref_tok: Tokenizer) -> ChatTemplate:
    return ChatTemplate(pref_tok)
