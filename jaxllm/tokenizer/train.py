"""Train a sentencepiece model (bpe, unigram, char, word) with jaxllm's fixed special-token ids.

Layout of every model: `<pad>`=0, `<unk>`=1, `<s>`=2, `</s>`=3, then `cfg.special_tokens` from
`SPECIAL_BASE` (4) on, then (with byte fallback) the 256 byte pieces, then learned pieces. The
trainer never sees the special strings: they are cut out of the text, so no learned piece
contains them, and `Tokenizer.encode` maps them to their ids itself.
"""

from __future__ import annotations

import heapq
import logging
import os
import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from jaxllm.config import TokenizerConfig
from jaxllm.errors import JaxllmError

log = logging.getLogger(__name__)

RESERVED = ("<pad>", "<unk>", "<s>", "</s>")  # ids 0..3, fixed for every model
SPECIAL_BASE = len(RESERVED)  # cfg.special_tokens[i] gets id SPECIAL_BASE + i


def train_tokenizer(
    texts: Iterable[str], cfg: TokenizerConfig, model_prefix: Path, seed: int = 0
) -> Path:
    """Trains on documents from `texts`; writes `<prefix>.model` and `.vocab`, returns the model.

    At most `cfg.max_train_chars` characters of lines are used (a seeded sample when the corpus
    is larger). Both files are replaced atomically, so a reader never sees a half-written model.
    """
    _check_cfg(cfg)
    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    specials = (*RESERVED, *cfg.special_tokens)
    lines = training_lines(texts, specials, cfg.max_train_chars, cfg.max_sentence_length, seed=seed)
    if not lines:
        raise JaxllmError("tokenizer training: the corpus has no text (every line was empty)")
    tmp = model_prefix.with_name(f".{model_prefix.name}.tmp{os.getpid()}")
    try:
        _run_trainer(lines, cfg, tmp)
        del lines
        _finish(Path(f"{tmp}.model"), model_prefix.name, cfg)
        os.replace(f"{tmp}.vocab", f"{model_prefix}.vocab")
        os.replace(f"{tmp}.model", f"{model_prefix}.model")
    finally:
        for ext in (".model", ".vocab"):
            Path(f"{tmp}{ext}").unlink(missing_ok=True)
    return Path(f"{model_prefix}.model")


def _check_cfg(cfg: TokenizerConfig) -> None:
    """Catches settings sentencepiece rejects with cryptic messages (or none) before training."""
    need = SPECIAL_BASE + len(cfg.special_tokens) + (256 if cfg.byte_fallback else 0) + 1
    if cfg.vocab_size < need:
        why = " (256 byte pieces for byte_fallback)" if cfg.byte_fallback else ""
        raise JaxllmError(
            f"tokenizer.vocab_size={cfg.vocab_size} is too small: the model reserves "
            f"{need - 1} ids{why}; use at least {need}, or more for learned pieces"
        )
    if not 0.98 <= cfg.character_coverage <= 1.0:
        raise JaxllmError(
            f"tokenizer.character_coverage={cfg.character_coverage}: sentencepiece needs a "
            "value in [0.98, 1.0]"
        )
    dup = {t for t in cfg.special_tokens if t in RESERVED or cfg.special_tokens.count(t) > 1}
    if dup or "" in cfg.special_tokens:
        raise JaxllmError(f"tokenizer.special_tokens: empty or repeated tokens {sorted(dup)}")


def _run_trainer(lines: list[str], cfg: TokenizerConfig, prefix: Path) -> None:
    """Calls the sentencepiece trainer quietly; its errors become one-line `JaxllmError`s."""
    # The word trainer adds a "▁<tok>" twin after each user-defined symbol, which shifts the
    # ids; control symbols keep them in place. Either way `Tokenizer` matches them itself.
    extra = "control_symbols" if cfg.model_type == "word" else "user_defined_symbols"
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_prefix=str(prefix),
            model_type=cfg.model_type,
            vocab_size=cfg.vocab_size,
            hard_vocab_limit=False,  # char/word/small corpora: fewer pieces instead of an error
            character_coverage=cfg.character_coverage,
            byte_fallback=cfg.byte_fallback,
            normalization_rule_name=cfg.normalization,  # config names are sentencepiece rule names
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,  # a leading "▁" would be stripped on decode: no round trip
            split_digits=True,
            allow_whitespace_only_pieces=True,
            max_sentence_length=cfg.max_sentence_length,
            num_threads=cfg.num_threads,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            pad_piece=RESERVED[0],
            unk_piece=RESERVED[1],
            bos_piece=RESERVED[2],
            eos_piece=RESERVED[3],
            minloglevel=2,  # errors only; they also come back as exceptions
            **{extra: list(cfg.special_tokens)},
        )
    except (RuntimeError, OSError, ValueError) as e:
        raise JaxllmError(
            f"sentencepiece could not train a {cfg.model_type} tokenizer "
            f"(vocab_size={cfg.vocab_size}): {_short(str(e))}"
        ) from None


def _short(msg: str) -> str:
    """`INTERNAL: src/x.cc(638) [cond] Human text.` → `Human text.` (or the condition)."""
    first = msg.strip().splitlines()[0] if msg.strip() else "unknown error"
    head, sep, tail = first.rpartition("] ")
    return tail if sep and tail else first


def _finish(model_file: Path, name: str, cfg: TokenizerConfig) -> None:
    """Asserts the fixed special ids, warns of a vocabulary smaller than asked for, and stores
    `name` as the model's prefix (not the temporary path), so equal inputs give equal bytes."""
    proto = model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    expected = (*RESERVED, *cfg.special_tokens)
    got = tuple(p.piece for p in proto.pieces[: len(expected)])
    if got != expected:
        raise JaxllmError(f"tokenizer training: special ids came out as {got}, not {expected}")
    if len(proto.pieces) != cfg.vocab_size:
        log.warning(
            "%s tokenizer has %d pieces, not the %d asked for: the training text supports no more",
            cfg.model_type,
            len(proto.pieces),
            cfg.vocab_size,
        )
    proto.trainer_spec.model_prefix = name
    model_file.write_bytes(proto.SerializeToString())


# ----------------------------------------------------------------------------- training text


def training_lines(
    texts: Iterable[str],
    specials: Iterable[str],
    max_chars: int,
    max_bytes: int,
    seed: int = 0,
) -> list[str]:
    """The non-empty lines of `texts` with `specials` cut out, at most `max_chars` in all.

    Streams: a bottom-k sample on seeded random keys keeps the lines with the smallest keys
    that fit the budget, so memory stays under `max_chars` however large the corpus; lines
    come back in corpus order. A corpus within the budget is kept whole.
    """
    rng = random.Random(seed)
    heap: list[tuple[float, int, str]] = []  # (-key, index, line): a max-heap on key
    total = 0
    for i, line in enumerate(_lines(texts, specials, max_bytes)):
        heapq.heappush(heap, (-rng.random(), i, line))
        total += len(line)
        while total > max_chars:
            total -= len(heapq.heappop(heap)[2])
    return [line for _, _, line in sorted(heap, key=lambda item: item[1])]


def _lines(texts: Iterable[str], specials: Iterable[str], max_bytes: int) -> Iterator[str]:
    ordered = sorted(set(specials), key=len, reverse=True)
    cut = re.compile("|".join(re.escape(s) for s in ordered)) if ordered else None
    for text in texts:
        if cut is not None:
            text = cut.sub("\n", text)  # a line break, so text either side never merges
        for line in text.split("\n"):
            if line:
                yield from split_long_line(line, max_bytes)


def split_long_line(line: str, max_bytes: int) -> Iterator[str]:
    """Cuts a line into pieces of at most `max_bytes` UTF-8 bytes (sentencepiece drops longer
    lines), at a space where one is near the end, never inside a character."""
    if len(line) * 4 <= max_bytes or len(data := line.encode("utf-8")) <= max_bytes:
        yield line
        return
    start = 0
    while start < len(data):
        end = min(start + max_bytes, len(data))
        if end < len(data):
            while end > start + 1 and (data[end] & 0xC0) == 0x80:  # continuation byte
                end -= 1
            space = data.rfind(b" ", start + max_bytes // 2, end)
            if space > start:
                end = space
        yield data[start:end].decode("utf-8")
        start = end
