"""`stage: tokenizer` — train a sentencepiece (or WordPiece) model on the cleaned train split, then measure it
on the validation split: tokens per character per source, exact round trips, encode speed."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from jaxllm.config import Config
from jaxllm.data.sources import iter_cleaned
from jaxllm.errors import DataError
from jaxllm.rundir import RunDir
from jaxllm.tokenizer import Tokenizer, train_tokenizer
from jaxllm.tokenizer.train import training_lines
from jaxllm.tokenizer.wordpiece import BERT_SPECIALS, WordPieceTokenizer, train_wordpiece
from jaxllm.trainers import require_input


def run(cfg: Config, run_dir: RunDir) -> dict[str, Any]:
    data_dir = require_input(cfg, "data_dir")
    t0 = time.perf_counter()
    texts = (rec["text"] for rec in iter_cleaned(data_dir, "train"))
    if cfg.tokenizer.model_type == "wordpiece":
        cut = (*BERT_SPECIALS, *cfg.tokenizer.special_tokens)
        lines = training_lines(texts, cut, cfg.tokenizer.max_train_chars, 1 << 30, seed=cfg.seed)
        model = train_wordpiece(lines, cfg.tokenizer, run_dir.path / "tokenizer")
        tok = WordPieceTokenizer.load(model)
    else:
        model = train_tokenizer(texts, cfg.tokenizer, run_dir.path / "tokenizer", seed=cfg.seed)
        tok = Tokenizer.load(model)
    train_s = time.perf_counter() - t0
    val = list(iter_cleaned(data_dir, "val")) or list(_head(iter_cleaned(data_dir, "train"), 2000))
    if not val:
        raise DataError(f"{data_dir}: no cleaned documents to evaluate the tokenizer on")
    return {
        "model_type": cfg.tokenizer.model_type,
        "vocab_size": tok.vocab_size,
        "train_seconds": round(train_s, 2),
        **evaluate(tok, val, cfg.tokenizer.num_threads),
        "outputs": {"tokenizer": str(model)},
    }


def evaluate(tok: Any, records: list[dict], num_threads: int) -> dict[str, Any]:
    """Tokens per character per source, round trips (exact; WordPiece: up to its normalisation
    and the spaces between words) and batched encode throughput."""
    texts = [r["text"] for r in records]
    t0 = time.perf_counter()
    ids = tok.encode_batch(texts, num_threads=num_threads)
    secs = max(time.perf_counter() - t0, 1e-9)
    chars: dict[str, int] = defaultdict(int)
    tokens: dict[str, int] = defaultdict(int)
    for rec, seq in zip(records, ids):
        chars[rec.get("source", "?")] += len(rec["text"])
        tokens[rec.get("source", "?")] += len(seq)
    same = getattr(tok, "same_text", lambda decoded, text: decoded == text)
    exact = sum(same(tok.decode(seq), text) for seq, text in zip(ids, texts))
    n_tok = sum(tokens.values())
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {
        "eval_docs": len(texts),
        "tokens_per_char": {s: round(tokens[s] / max(chars[s], 1), 4) for s in sorted(chars)},
        "tokens_per_char_all": round(n_tok / max(sum(chars.values()), 1), 4),
        "round_trip_exact": f"{exact}/{len(texts)}",
        "encode_tokens_per_s": round(n_tok / secs),
        "encode_mb_per_s": round(n_bytes / secs / 1e6, 2),
    }


def _head(it, n: int):
    for i, x in enumerate(it):
        if i >= n:
            return
        yield x
