"""Shared fixtures for the SFT tests: a small tokenizer with the chat tokens."""

import json
from pathlib import Path

import pytest

from jaxllm.config import TokenizerConfig
from jaxllm.tokenizer import Tokenizer, train_tokenizer
from jaxllm.tokenizer.chat import ChatTemplate

ROOT = Path(__file__).resolve().parent.parent.parent
SFT_TRAIN = ROOT / "jaxllm" / "assets" / "sft" / "train.jsonl"


def sft_texts(limit: int = 2000) -> list[str]:
    rows = [json.loads(x) for x in SFT_TRAIN.read_text(encoding="utf-8").splitlines()[:limit]]
    return [f"<s>{r['prompt']}\n{r['response']}</s>" for r in rows]


@pytest.fixture(scope="session")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    cfg = TokenizerConfig(vocab_size=1300, character_coverage=0.98)
    path = train_tokenizer(sft_texts(), cfg, tmp_path_factory.mktemp("tok") / "tokenizer")
    return Tokenizer.load(path)


@pytest.fixture(scope="session")
def template(tok: Tokenizer) -> ChatTemplate:
    return ChatTemplate(tok)
