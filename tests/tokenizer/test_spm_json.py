"""A jaxllm sentencepiece model → tokenizer.json: `transformers`' AutoTokenizer gives the ids
`Tokenizer.encode` gives (checked on generated and shipped text, for every model type and
normalisation the tokenizer stage trains), decodes to the same text, and renders the chat
template as `ChatTemplate` does."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from jaxllm.tokenizer import Tokenizer, train_tokenizer
from jaxllm.tokenizer.chat import ChatTemplate
from jaxllm.tokenizer.spm_json import write_hf_tokenizer
from tests.tokenizer.test_tokenizer import EXACT, RARE, _document, _shipped

transformers = pytest.importorskip("transformers")

TRICKY = [
    "  two leading spaces, double  space, trailing spaces   ",
    "\ttabs\tand\t\ttabs\n\nblank lines\n\n\n",
    " \n \n",
    f"rare hanzi {RARE} unseen: 龘龘 and emoji 😀👍🏽 ZWJ 👩‍👩‍👧",
    "the literal pieces <0x41> ▁x and <pad> <s>nested</s></s>".replace("▁x", "<0xE2>"),
    "\x00 nul \r\n crlf \u3000 ideographic space \ufeff bom e\u0301 combining ﬁ ①",
    "<|user|>\n  hi <|end|><|assistant|><think></think>ok<|end|>",
    "digits 1234567 and 3.14159, 1,000,000",
    "",
]


@pytest.fixture(scope="module")
def texts() -> tuple[list[str], list[str]]:
    """(training text, held-out text): generated documents and shipped corpus slices."""
    rng = random.Random(0)
    train = [_document(rng) for _ in range(300)] + _shipped("kjv", 30) + _shipped("tang300", 60)
    train.append("<bytes> such as <0x41>")  # unigram: see spm_json's docstring
    held = [_document(rng) for _ in range(100)] + _shipped("kjv", 50)[30:] + TRICKY
    return train, held


CASES = {
    "bpe": {},
    "unigram": {"model_type": "unigram"},
    "char": {"model_type": "char", "vocab_size": 30_000},
    "bpe_nmt_nfkc": {"normalization": "nmt_nfkc"},
    "unigram_nfkc": {"model_type": "unigram", "normalization": "nfkc"},
    "bpe_no_byte_fallback": {"byte_fallback": False, "character_coverage": 0.999},
}


@pytest.mark.parametrize("case", CASES)
def test_auto_tokenizer_gives_jaxllm_ids(case, texts, tmp_path: Path) -> None:
    train, held = texts
    cfg = dataclasses.replace(EXACT, **CASES[case])
    tok = Tokenizer.load(train_tokenizer(train, cfg, tmp_path / "tokenizer"))
    write_hf_tokenizer(tok, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in held:
        if case == "bpe_nmt_nfkc":  # tokenizers reads a CRLF as one character (docstring)
            text = text.replace("\r\n", "\n")
        ids = tok.encode(text)
        assert hf(text, add_special_tokens=False).input_ids == ids, (case, text[:80])
        assert hf(text).input_ids == [tok.bos_id, *ids]  # generate's prompt: <s> first
        assert hf.decode(ids) == tok.decode(ids), (case, text[:80])
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (
        tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id
    )  # fmt: skip
    assert hf.decode([tok.bos_id, 17, tok.eos_id], skip_special_tokens=True) == tok.decode(
        [tok.bos_id, 17, tok.eos_id], skip_special=True
    )


def test_chat_template_renders_as_jaxllm(tok, tmp_path: Path) -> None:
    write_hf_tokenizer(tok, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    template = ChatTemplate(tok)
    chats = [
        [{"role": "user", "content": "What is 17 + 25?"}],
        [
            {"role": "system", "content": "Answer briefly. Think in <think> first."},
            {"role": "user", "content": " two  spaces\nand a line"},
            {"role": "assistant", "content": "<think>7+5=12</think>42"},
            {"role": "user", "content": "天地玄黄"},
        ],
    ]
    for chat in chats:
        prompt = hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        assert list(getattr(prompt, "input_ids", prompt)) == template.prompt_ids(chat)
        done = [*chat, {"role": "assistant", "content": "ok."}]
        full = hf.apply_chat_template(done, tokenize=True)
        assert list(getattr(full, "input_ids", full)) == template.render(done).ids


def test_word_models_are_refused_with_a_reason(texts, tmp_path: Path) -> None:
    cfg = dataclasses.replace(EXACT, model_type="word", vocab_size=30_000)
    tok = Tokenizer.load(train_tokenizer(texts[0], cfg, tmp_path / "tokenizer"))
    with pytest.raises(ValueError, match="word-level"):
        write_hf_tokenizer(tok, tmp_path)
