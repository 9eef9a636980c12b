"""Tokenizer training and encode/decode: fixed special ids, exact round trips, batching, files."""

from __future__ import annotations

import dataclasses
import gzip
import json
import random
from pathlib import Path

import pytest

from jaxllm.config import CHAT_TOKENS, TokenizerConfig, resolve_path
from jaxllm.errors import JaxllmError
from jaxllm.tokenizer import SPECIAL_BASE, Tokenizer, train_tokenizer
from jaxllm.tokenizer.train import split_long_line, training_lines

_ENGLISH = (
    "the a of and to in is was he she it they we you light water earth king city road river "
    "sun moon star night day morning evening said went came saw gave took made found number "
    "one two three four five six seven over under before after with without into upon from"
)
WORDS = _ENGLISH.split()
HANZI = (
    "天地玄黄宇宙洪荒日月盈昃辰宿列张寒来暑往秋收冬藏闰余成岁律吕调阳云腾致雨露结为霜金生丽水"
    "玉出昆冈剑号巨阙珠称夜光果珍李柰菜重芥姜海咸河淡鳞潜羽翔龙师火帝鸟官人皇始制文字乃服衣裳"
    "山风春花秋月江湖明白我你他说来去大小上下中国家学生"
)
RARE = "龘鱻𠀀"  # never in the training text: must go through byte fallback
EXACT = TokenizerConfig(vocab_size=4000, character_coverage=1.0)


def _sentence(rng: random.Random) -> str:
    if rng.random() < 0.5:
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        words[0] = words[0].capitalize()
        return " ".join(words) + rng.choice([".", "!", "?", f" {rng.randint(0, 9999)}."])
    return "".join(rng.choice(HANZI) for _ in range(rng.randint(6, 20))) + rng.choice("。！？，")


def _document(rng: random.Random) -> str:
    body = "\n".join(_sentence(rng) for _ in range(rng.randint(1, 5)))
    if rng.random() < 0.3:  # chat-formatted, with every chat token
        return (
            f"<s><|system|>{_sentence(rng)}<|end|>\n<|user|>{body}<|end|>\n"
            f"<|assistant|><think>{_sentence(rng)}</think>{_sentence(rng)}<|end|></s>"
        )
    return f"<s>{body}</s>"


def _shipped(name: str, n: int) -> list[str]:
    """The first `n` documents of a shipped corpus, or none where it is not installed."""
    path = resolve_path(f"asset:corpus/{name}.jsonl.gz")
    if not path.is_file():
        return []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"][:3000] for _, line in zip(range(n), f)]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    rng = random.Random(0)
    docs = [_document(rng) for _ in range(400)] + _shipped("kjv", 40) + _shipped("tang300", 80)
    assert not any(c in doc for doc in docs for c in RARE)
    return docs


@pytest.fixture(scope="module")
def heldout() -> list[str]:
    rng = random.Random(1)
    tricky = [
        "  two leading spaces, double  space, trailing spaces   ",
        "\ttabs\tand\t\ttabs\n\nblank lines\n\n\n",
        " \n \n",
        f"rare hanzi {RARE} unseen: 龘龘",
        "emoji 😀👍🏽 and flags 🇨🇳 ZWJ 👩‍👩‍👧",
        "a literal ▁ block ▁▁ and <unk> and <s>nested</s></s>",
        "\x00 nul \r\n crlf \u3000 ideographic space \ufeff bom e\u0301 combining",
        "<|user|>\n  hi <|end|><|assistant|><think></think>ok<|end|>",
        "<pad><pad>",
        "",
    ]
    return [_document(rng) for _ in range(100)] + tricky


@pytest.fixture(scope="module")
def tok(corpus: list[str], tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.load(train_tokenizer(corpus, EXACT, tmp_path_factory.mktemp("bpe") / "tok"))


def test_special_ids_are_fixed(tok: Tokenizer) -> None:
    reserved = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    assert tok.special_ids == reserved | {t: SPECIAL_BASE + i for i, t in enumerate(CHAT_TOKENS)}
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, SPECIAL_BASE) == (0, 1, 2, 3, 4)
    assert tok.encode("<|user|>") == [4 + 1]
    for i, t in enumerate(CHAT_TOKENS):
        assert tok.encode(t) == [SPECIAL_BASE + i]
        assert tok.id_to_piece(SPECIAL_BASE + i) == t
    assert tok.encode("<s><pad></s>") == [2, 0, 3]


def test_specials_are_not_learned_pieces(tok: Tokenizer) -> None:
    parts = ["<s>", "</s>", "<pad>", "<|", "|>", "think>", *CHAT_TOKENS]
    learned = [tok.id_to_piece(i) for i in range(len(tok.special_ids), tok.vocab_size)]
    assert [p for p in learned if any(s in p for s in parts)] == []


def test_exact_round_trip_on_heldout(tok: Tokenizer, heldout: list[str]) -> None:
    failed = [t for t in heldout if tok.decode(tok.encode(t)) != t]
    assert failed == []


def test_random_text_round_trips(tok: Tokenizer) -> None:
    rng = random.Random(2)
    alphabet = [*"ab zc\t\n  ▁<>|/s", "<s>", "</s>", "<|user|>", "<think>", "鑫", "😀", "\x00"]
    texts = ["".join(rng.choices(alphabet, k=rng.randint(0, 40))) for _ in range(500)]
    assert [t for t in texts if tok.decode(tok.encode(t)) != t] == []


def test_unseen_characters_use_byte_fallback(tok: Tokenizer) -> None:
    for ch in RARE:
        ids = tok.encode(ch)
        assert len(ids) == len(ch.encode("utf-8")) and all(tok.is_byte(i) for i in ids)
        assert tok.decode(ids) == ch
    assert tok.encode("▁") == [tok.piece_to_id(f"<0x{b:02X}>") for b in "▁".encode()]


def test_spaces_survive_without_a_space_piece(tmp_path: Path) -> None:
    """A Chinese-only model has no "▁" piece; spaces then go through the space byte."""
    rng = random.Random(3)
    docs = ["".join(rng.choice(HANZI) for _ in range(30)) for _ in range(200)]
    tok = Tokenizer.load(train_tokenizer(docs, EXACT, tmp_path / "zh"))
    assert tok.piece_to_id("▁") == tok.unk_id
    for text in ["天 地", "  天地 ", "a ▁ b", "天\t地 \n"]:
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("model_type", ["bpe", "unigram", "char", "word"])
@pytest.mark.parametrize("byte_fallback", [True, False])
def test_model_types_round_trip_seen_text(
    model_type: str, byte_fallback: bool, corpus: list[str], tmp_path: Path
) -> None:
    size = 30_000 if model_type in ("char", "word") else EXACT.vocab_size  # all seen chars/words
    cfg = dataclasses.replace(
        EXACT, model_type=model_type, byte_fallback=byte_fallback, vocab_size=size
    )
    tok = Tokenizer.load(train_tokenizer(corpus, cfg, tmp_path / model_type))
    assert list(tok.special_ids.values()) == list(range(SPECIAL_BASE + len(CHAT_TOKENS)))
    assert tok.vocab_size <= cfg.vocab_size
    learned = [tok.id_to_piece(i) for i in range(len(tok.special_ids), tok.vocab_size)]
    assert [p for p in learned if any(s in p for s in tok.special_ids)] == []
    # Without byte fallback, seen text is what the trainer saw: lines (it never sees a newline).
    seen = corpus if byte_fallback else [line for d in corpus for line in d.split("\n")]
    assert [d for d in seen if tok.decode(tok.encode(d)) != d] == []


def test_encode_batch_matches_encode(tok: Tokenizer, heldout: list[str]) -> None:
    for bos, eos in [(False, False), (True, False), (False, True), (True, True)]:
        one = [tok.encode(t, add_bos=bos, add_eos=eos) for t in heldout]
        assert tok.encode_batch(heldout, add_bos=bos, add_eos=eos, num_threads=2) == one
    ids = tok.encode_batch(heldout)
    assert tok.decode_batch(ids) == [tok.decode(i) for i in ids] == heldout
    assert tok.encode_batch([]) == [] and tok.decode_batch([]) == []


def test_bos_eos_and_skip_special(tok: Tokenizer) -> None:
    text = "<|user|>hello 天地<|end|>"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids == [tok.bos_id, *tok.encode(text), tok.eos_id]
    assert tok.decode(ids) == f"<s>{text}</s>"
    assert tok.decode(ids, skip_special=True) == "hello 天地"
    assert tok.encode("") == [] and tok.encode("", add_bos=True, add_eos=True) == [2, 3]


def test_decode_accepts_numpy_and_rejects_bad_ids(tok: Tokenizer) -> None:
    np = pytest.importorskip("numpy")
    ids = tok.encode("<s>the sun 日月</s>")
    assert tok.decode(np.asarray(ids, dtype=np.int32)) == "<s>the sun 日月</s>"
    with pytest.raises(JaxllmError, match=f"token id {tok.vocab_size} is out of range"):
        tok.decode([5, tok.vocab_size])


def test_save_load_round_trip(tok: Tokenizer, heldout: list[str], tmp_path: Path) -> None:
    saved = tok.save(tmp_path / "run")
    assert saved == tmp_path / "run" / "tokenizer.model"
    for again in (Tokenizer.load(saved), Tokenizer.load(tmp_path / "run")):
        assert again.encode_batch(heldout) == tok.encode_batch(heldout)
        assert again.special_ids == tok.special_ids and again.vocab_size == tok.vocab_size
    assert "vocab_size=" in repr(tok) and "bpe" in repr(tok)


def test_load_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "x.model"
    with pytest.raises(JaxllmError, match="not found") as err:
        Tokenizer.load(missing)
    assert str(missing) in str(err.value) and "\n" not in str(err.value)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\xff\x00 not a model" * 10)
    with pytest.raises(JaxllmError, match="not a valid sentencepiece model") as err:
        Tokenizer.load(junk)
    assert str(junk) in str(err.value) and "\n" not in str(err.value)


def test_training_writes_atomically_and_deterministically(
    corpus: list[str], tmp_path: Path
) -> None:
    cfg = dataclasses.replace(EXACT, model_type="unigram")
    a = train_tokenizer(corpus, cfg, tmp_path / "a" / "tok")
    b = train_tokenizer(iter(corpus), cfg, tmp_path / "b" / "tok")
    assert sorted(p.name for p in a.parent.iterdir()) == ["tok.model", "tok.vocab"]
    assert a.read_bytes() == b.read_bytes()


def test_training_errors_are_one_line(corpus: list[str], tmp_path: Path) -> None:
    cases = [
        (dataclasses.replace(EXACT, vocab_size=100), corpus, "vocab_size=100 is too small"),
        (dataclasses.replace(EXACT, vocab_size=600), corpus, "smaller than required_chars"),
        (EXACT, ["", "<s></s>", "\n\n"], "no text"),
        (dataclasses.replace(EXACT, character_coverage=0.5), corpus, "character_coverage"),
    ]
    for cfg, docs, message in cases:
        with pytest.raises(JaxllmError, match=message) as err:
            train_tokenizer(docs, cfg, tmp_path / "tok")
        assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []  # failed runs leave no files behind


def test_training_lines_sample_within_the_cap() -> None:
    docs = [f"<s>doc {i} line one\n\nline two of {i}<|end|>tail {i}</s>" for i in range(1000)]
    full = training_lines(docs, ["<s>", "</s>", "<|end|>"], 10**9, 1000)
    assert full[:4] == ["doc 0 line one", "line two of 0", "tail 0", "doc 1 line one"]
    capped = training_lines(docs, ["<s>", "</s>", "<|end|>"], 5000, 1000, seed=0)
    assert 4900 <= sum(map(len, capped)) <= 5000
    positions = [full.index(line) for line in capped]  # a sample of lines, in corpus order
    assert positions == sorted(positions)
    assert capped == training_lines(iter(docs), ["<s>", "</s>", "<|end|>"], 5000, 1000, seed=0)
    assert capped != training_lines(docs, ["<s>", "</s>", "<|end|>"], 5000, 1000, seed=1)


def test_long_lines_are_split_at_character_boundaries() -> None:
    line = "天地玄黄 the quick brown fox 😀" * 50
    pieces = list(split_long_line(line, 64))
    assert "".join(pieces) == line and len(pieces) > 1
    assert all(len(p.encode("utf-8")) <= 64 for p in pieces)
    assert list(split_long_line("short", 64)) == ["short"]


def test_specials_false_encodes_special_strings_as_text(tok: Tokenizer) -> None:
    from jaxllm.data.pipeline import encode_documents

    text = "<s>Was $20</s> now <|user|>hi<|end|> ▁ and <pad>"
    ids = tok.encode(text, specials=False)
    assert not set(ids) & set(tok.special_ids.values())
    assert tok.decode(ids) == text
    assert tok.encode(text)[0] == tok.bos_id  # by default they are specials
    # a cleaned document: its wrapper is BOS/EOS, a tag inside it stays text
    assert encode_documents(tok, [f"<s>{text}</s>"]) == [[tok.bos_id, *ids, tok.eos_id]]
