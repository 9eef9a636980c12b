"""Text classification data: labelled JSONL files → encoder batches, in grain pipelines.

    read + check every record ─► examples[process_index::process_count] ─► shuffle ─► repeat
      ─► encode (`[CLS] text [SEP]`, or `[CLS] text [SEP] text_pair [SEP]`) ─► batch(B)

A record is `{"text": ..., "label": ...}` or a sentence pair `{"text", "text_pair", "label"}`
(`.jsonl` or `.jsonl.gz`, read by the one hardened JSONL reader). Files are read and checked
whole before anything trains, so a bad line stops the run with `file:line` before any output:
an empty or missing text, a label outside the configured set, and in a pair file (its first
training record has `text_pair`) a record without one — or, in a single-text file, one with.
Rows are padded to `seq_len` (texts cut by BERT's truncation); batch keys: `tokens`,
`token_types`, `segment_ids` (1 real / 0 pad) [B, L]; `labels`, `index` (the example's
position; -1 on padding rows) int32 and `weights` (0 on padding rows) float32 [B].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grain
import numpy as np

from jaxllm.config import LoaderConfig
from jaxllm.data.pipeline import (
    Batch,
    _grain_seed,
    _PadBatchesIterDataset,
    fill_batch,
    finish_batches,
    local_batch_size,
)
from jaxllm.errors import DataError
from jaxllm.jsonl import read_jsonl
from jaxllm.tokenizer.wordpiece import WordPieceTokenizer


@dataclass(frozen=True)
class Example:
    """One labelled record: its text (and pair), label id, position and source line."""

    text: str
    pair: str | None
    label: int
    index: int  # position in its file's list of examples
    line: int  # 1-based line in the file


def _text(record: dict[str, Any], key: str, where: str) -> str:
    value = record.get(key)
    if value is None:
        raise DataError(f"{where}: record has no key {key!r}; fix or remove the line")
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: empty {key!r}; fix or remove the line")
    return value


def _label(record: dict[str, Any], where: str) -> str:
    value = record.get("label")
    if value is None:
        raise DataError(f"{where}: record has no key 'label'; fix or remove the line")
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise DataError(f"{where}: 'label' must be a string or an integer, got {value!r}")
    return str(value)


def read_labelled(path: Path, key: str = "") -> tuple[list[tuple[int, dict[str, Any]]], bool]:
    """`((line, record) pairs, is a pair file)` of a labelled JSONL file; a file without
    records is an error (naming the config `key` that names the file, when given)."""
    rows = list(read_jsonl(path))
    if not rows:
        head = f"config key '{key}': {path} holds no records" if key else f"{path}: no records"
        raise DataError(f"{head}; expected JSONL lines of {{'text', 'label'}}")
    return rows, "text_pair" in rows[0][1]


def labels_of(rows: Sequence[tuple[int, dict[str, Any]]], path: Path) -> tuple[str, ...]:
    """The sorted label set of a file (for `classify.labels: []`): by number when every label
    is an integer ("2" before "10"), else as strings."""
    names = {_label(r, f"{path}:{n}") for n, r in rows}
    numeric = all(x.lstrip("-").isdigit() for x in names)
    return tuple(sorted(names, key=lambda x: (int(x), x) if numeric else (0, x)))


def make_examples(
    rows: Sequence[tuple[int, dict[str, Any]]], path: Path, labels: Sequence[str], pairs: bool,
    pair_source: Path,
) -> list[Example]:  # fmt: skip
    """Checked examples of one file's records; `pairs` (decided by `pair_source`'s first
    record) says whether every record must have `text_pair` or none may."""
    ids = {name: i for i, name in enumerate(labels)}
    out = []
    for i, (n, r) in enumerate(rows):
        where = f"{path}:{n}"
        text, label = _text(r, "text", where), _label(r, where)
        if label not in ids:
            raise DataError(
                f"{where}: label {label!r} is not one of classify.labels "
                f"[{', '.join(labels)}]; add it there or fix the line"
            )
        if pairs and "text_pair" not in r:
            raise DataError(
                f"{where}: record has no 'text_pair', but {pair_source}'s first record has "
                "one: in a sentence-pair file every record needs it"
            )
        if not pairs and "text_pair" in r:
            raise DataError(
                f"{where}: record has 'text_pair', but {pair_source}'s first record has none: "
                "give every record of a pair file a text_pair, from the first one on"
            )
        pair = _text(r, "text_pair", where) if pairs else None
        out.append(Example(text, pair, ids[label], i, n))
    return out


class EncodeExample:
    """An `Example` as one padded row (grain map; runs in the read threads)."""

    def __init__(self, tok: WordPieceTokenizer, seq_len: int) -> None:
        self.tok, self.seq_len = tok, seq_len

    def __call__(self, ex: Example) -> dict[str, np.ndarray]:
        if ex.pair is None:
            ids = self.tok.encode_single(ex.text, self.seq_len)
            types = [0] * len(ids)
        else:
            ids, types = self.tok.encode_pair(ex.text, ex.pair, self.seq_len)
        pad = self.seq_len - len(ids)
        return {
            "tokens": np.pad(np.asarray(ids, np.int32), (0, pad)),
            "token_types": np.pad(np.asarray(types, np.int32), (0, pad)),
            "segment_ids": np.pad(np.ones(len(ids), np.int32), (0, pad)),
            "labels": np.int32(ex.label),
            "weights": np.float32(1.0),
            "index": np.int32(ex.index),
        }


def make_classify_dataset(
    examples: Sequence[Example],
    tok: WordPieceTokenizer,
    loader: LoaderConfig,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    repeat: bool = True,
) -> grain.IterDataset:
    """Training batches of this process's share of the examples: shuffled (reshuffled each
    epoch) and endless with `repeat`; the iterator's state is JSON data."""
    ds = _share(examples, process_index, process_count)
    if loader.shuffle:
        ds = ds.shuffle(seed=_grain_seed(seed))
    if repeat:
        ds = ds.repeat()
    return _batches(ds, tok, loader, process_count)


def make_classify_eval_dataset(
    examples: Sequence[Example],
    tok: WordPieceTokenizer,
    loader: LoaderConfig,
    *,
    process_index: int = 0,
    process_count: int = 1,
    num_batches: int | None = None,
) -> grain.IterDataset:
    """One ordered pass over this process's share, the last batch padded (weight 0, index
    -1), topped up with empty batches to `num_batches` (`eval_batch_count`)."""
    ds = _share(examples, process_index, process_count)
    batches = _batches(ds, tok, loader, process_count)
    if num_batches is not None:
        empty = _empty_batch(local_batch_size(loader, process_count), loader.seq_len)
        batches = _PadBatchesIterDataset(batches, num_batches, empty)
    return batches


def eval_batch_count(n_examples: int, loader: LoaderConfig, process_count: int) -> int:
    """Batches every process runs so that together they cover all `n_examples`."""
    share = math.ceil(n_examples / process_count)
    return math.ceil(share / local_batch_size(loader, process_count))


def _share(examples: Sequence[Example], process_index: int, process_count: int):
    if not examples:
        raise DataError("no labelled examples given")
    return grain.MapDataset.source(list(examples))[process_index::process_count]


def _batches(ds: grain.MapDataset, tok, loader: LoaderConfig, process_count: int):
    rows = local_batch_size(loader, process_count)
    read = grain.ReadOptions(num_threads=loader.num_threads, prefetch_buffer_size=4 * rows)
    empty = _empty_batch(rows, loader.seq_len)
    encoded = ds.map(EncodeExample(tok, loader.seq_len)).to_iter_dataset(read)
    batches = encoded.batch(rows, drop_remainder=False).map(lambda b: fill_batch(b, empty))
    return finish_batches(batches, loader)


def _empty_batch(rows: int, seq_len: int) -> Batch:
    out: Batch = {k: np.zeros((rows, seq_len), np.int32)
                  for k in ("tokens", "token_types", "segment_ids")}  # fmt: skip
    out["labels"] = np.zeros(rows, np.int32)
    out["weights"] = np.zeros(rows, np.float32)
    out["index"] = np.full(rows, -1, np.int32)
    return out
