"""BERT pretraining examples: sentence pairs for next-sentence prediction, masked for the
masked-LM, in a grain pipeline (seeded, sharded per process, resumable).

    docs[process_index::process_count] ─► shuffle ─► repeat ─► random_map(document → pairs)
      ─► to_iter_dataset(read threads) ─► flat map ─► window shuffle ─► batch(B) ─► prefetch

A document (a cleaned corpus record, its `<s>…</s>` markers dropped) is split into sentences
(after `. ! ?` followed by a space, after `。！？`, and at line breaks) and each sentence
tokenized. As in BERT's `create_pretraining_data`, consecutive sentences gather into a chunk
of about `seq_len - 3` tokens (a random shorter length for `short_seq_prob` of the chunks;
at least two sentences), cut at a random sentence boundary into A and the rest. With
probability 1/2, B is that rest (label 0, "is next"); otherwise B is a run of sentences from
a random other document of this process's slice (label 1). Unlike BERT, the rest of a
negative's chunk is not put back to start the next chunk: that makes documents shorter than
a chunk yield more negatives than positives (2/3 of the labels on short documents,
measured); here every chunk gives one pair whatever its label, so the labels are 50/50. A
trailing single sentence has no true next and makes no pair. The pair is cut to `seq_len` by
`pair_ids` (the longer side loses tokens from its end) as `[CLS] A [SEP] B [SEP]`.

With `mlm.nsp: false` (RoBERTa's DOC-SENTENCES) a document gives single-segment rows
instead (`document_chunks`): `[CLS] consecutive sentences [SEP]`, about `seq_len - 2`
tokens each, every sentence used (a one-sentence document makes one row; as pairs it makes
none), token types 0; `nsp_labels` 0 and the trainer leaves out the NSP term.

Masking (`choose_masks`): of the non-special tokens, round(mask_prob · n) (at least 1, at most
M) are chosen — whole words with `whole_word` (a token and its `##` continuations; a Chinese
character is a word already) — and of those 80 % become `[MASK]`, 10 % a random non-special
token, 10 % stay. Every draw comes from the generator grain's `random_map` seeds with the
pipeline seed and the element's index, so a pass is a pure function of (seed, position): the
iterator state (JSON data) restores it exactly.

Batch keys: `tokens`, `token_types`, `segment_ids` (1 real / 0 pad) [B, L]; `mask_positions`,
`mask_targets` (int32), `mask_weights` (float32, 0 on unused slots) [B, M]; `nsp_labels`
(int32), `nsp_weights` (float32, 0 on padding rows) [B].
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import grain
import numpy as np

from jaxllm.config import LoaderConfig, MLMConfig
from jaxllm.data.jsonl_source import JsonlSource
from jaxllm.data.pipeline import (
    _DOC_PREFETCH,
    Batch,
    _grain_seed,
    _PadBatchesIterDataset,
    fill_batch,
    finish_batches,
    local_batch_size,
)
from jaxllm.errors import DataError
from jaxllm.tokenizer.wordpiece import MASK, WordPieceTokenizer, pair_ids

IS_NEXT, IS_RANDOM = 0, 1  # nsp_labels, as BERT and transformers' BertForPreTraining
_SHUFFLE_WINDOW = 512  # pairs shuffled together, so one document's pairs spread over batches
_BREAK = re.compile(
    r"(?<=[.!?])\s+|(?<=[.!?][\"'”’)\]])\s+"  # English: an end mark (+ a closing quote), space
    r"|(?<=[。！？])(?![。！？”」』）\"'])|(?<=[。！？][”」』）\"'])"  # Chinese: no space follows
    r"|\s*\n\s*"  # line breaks
)
Pair = tuple[list[int], list[int], int]  # (A ids, B ids, nsp label)


def split_sentences(text: str) -> list[str]:
    """The sentences of a document, stripped, empty ones dropped; `<s>`/`</s>` markers (the
    cleaned corpus's document bounds) removed first."""
    text = text.removeprefix("<s>").removesuffix("</s>")
    return [s.strip() for s in _BREAK.split(text) if s and s.strip()]


def max_predictions(cfg: MLMConfig, seq_len: int) -> int:
    """M, the static number of prediction slots per row."""
    return cfg.max_predictions or math.ceil(cfg.mask_prob * seq_len) + 1


def document_pairs(
    sents: Sequence[Sequence[int]],
    rng: np.random.Generator,
    max_tokens: int,
    short_seq_prob: float,
    random_run: Callable[[np.random.Generator, int], list[int] | None],
) -> list[Pair]:
    """(A, B, label) pairs of one tokenized document (see the module docstring).
    `random_run(rng, n)` gives at least n tokens of consecutive sentences from another
    document (None when there is none)."""
    pairs: list[Pair] = []
    i, n = 0, len(sents)
    while i < n:
        target = max_tokens
        if rng.random() < short_seq_prob:
            target = int(rng.integers(2, max_tokens + 1))
        j, size = i, 0
        while j < n and (size < target or j - i < 2):
            size, j = size + len(sents[j]), j + 1
        if j - i < 2:  # one sentence left: it has no true next
            break
        a_end = int(rng.integers(i + 1, j))
        a = [t for s in sents[i:a_end] for t in s]
        if rng.random() < 0.5:
            pairs.append((a, [t for s in sents[a_end:j] for t in s], IS_NEXT))
        elif (b := random_run(rng, max(target - len(a), 1))) is not None:
            pairs.append((a, b, IS_RANDOM))
        i = j  # both labels move on alike, so the labels stay 50/50 (see the module doc)
    return pairs


def document_chunks(
    sents: Sequence[Sequence[int]], rng: np.random.Generator, max_tokens: int,
    short_seq_prob: float,
) -> list[list[int]]:  # fmt: skip
    """Single-segment rows of one tokenized document (`nsp: false`, RoBERTa's
    DOC-SENTENCES): consecutive sentences gathered up to `max_tokens` (a random shorter
    target for `short_seq_prob` of the chunks); a sentence that does not fit starts the
    next chunk, one longer than `max_tokens` is cut into pieces. Every token lands in a
    chunk, so a one-sentence document (most short reviews) still makes a row."""
    pieces = [s[i : i + max_tokens] for s in sents for i in range(0, len(s), max_tokens)]

    def target() -> int:
        short = rng.random() < short_seq_prob
        return int(rng.integers(2, max_tokens + 1)) if short else max_tokens

    chunks: list[list[int]] = []
    chunk: list[int] = []
    room = target()
    for piece in pieces:
        if chunk and len(chunk) + len(piece) > room:
            chunks.append(chunk)
            chunk, room = [], target()
        chunk = chunk + list(piece)
    return chunks + [chunk] if chunk else chunks


def choose_masks(
    ids: Sequence[int],
    rng: np.random.Generator,
    *,
    mask_prob: float,
    max_predictions: int,
    special_V: np.ndarray,
    continuation_V: np.ndarray | None = None,
    mask_id: int = MASK,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(input ids, chosen positions (sorted), their original ids)` of one row.
    `continuation_V` (whole-word masking) marks `##` pieces, which join the word before;
    `mask_id`: the tokenizer's `[MASK]`."""
    ids_L = np.asarray(ids, np.int32)
    cand = np.flatnonzero(~special_V[ids_L])
    starts = np.ones(len(cand), bool)
    if continuation_V is not None and len(cand):
        starts = ~continuation_V[ids_L[cand]] | (np.diff(cand, prepend=-2) != 1)
    words = np.split(cand, np.flatnonzero(starts)[1:]) if len(cand) else []
    want = min(max_predictions, max(1, round(len(cand) * mask_prob))) if len(cand) else 0
    chosen: list[int] = []
    for w in rng.permutation(len(words)):
        if len(chosen) + len(words[w]) <= want:
            chosen.extend(words[w].tolist())
        if len(chosen) == want:
            break
    positions = np.sort(np.asarray(chosen, np.int32))
    targets = ids_L[positions]
    draw = rng.random(len(positions))
    out = ids_L.copy()
    out[positions[draw < 0.8]] = mask_id
    swap = positions[(draw >= 0.8) & (draw < 0.9)]
    normal = np.flatnonzero(~special_V)
    out[swap] = rng.choice(normal, size=len(swap)).astype(np.int32)
    return out, positions, targets


class PairMaker:
    """`(doc_index, rng) -> rows`: the masked pairs of one document of this process's slice,
    for grain's `random_map`. Negatives come from other documents of the same slice, so NSP
    needs 2 documents per process (`mlm.nsp: false`: 1). `where` names the split's shards
    in messages."""

    def __init__(
        self, source: JsonlSource, tok: WordPieceTokenizer, cfg: MLMConfig, seq_len: int,
        process_index: int, process_count: int, where: str = "",
    ) -> None:  # fmt: skip
        self.source, self.tok, self.cfg, self.seq_len = source, tok, cfg, seq_len
        self.pi, self.pc = process_index, process_count
        self.local = len(range(process_index, len(source), process_count))
        need = 2 if cfg.nsp else 1
        if self.local < need:
            why = ("sentence pairs (mlm.nsp: true) need at least 2 documents per process "
                   "(negatives come from another one)" if cfg.nsp else
                   "mlm needs at least 1 document per process")  # fmt: skip
            raise DataError(
                f"{where or repr(source)}: {len(source)} documents for {process_count} processes; {why}"
            )
        self.m = max_predictions(cfg, seq_len)
        self.special_V = tok.special_mask()
        self.continuation_V = tok.continuation_mask() if cfg.whole_word else None

    def __call__(self, doc_index: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
        sents = [s for s in self.tok.encode_batch(self._sentences(doc_index)) if s]

        def random_run(rng: np.random.Generator, n: int) -> list[int] | None:
            return self._random_run(int(doc_index), rng, n)

        if not self.cfg.nsp:
            chunks = document_chunks(sents, rng, self.seq_len - 2, self.cfg.short_seq_prob)
            return [self._row(c, None, IS_NEXT, rng) for c in chunks]
        pairs = document_pairs(sents, rng, self.seq_len - 3, self.cfg.short_seq_prob, random_run)
        return [self._row(a, b, label, rng) for a, b, label in pairs]

    def _sentences(self, doc_index: int) -> list[str]:
        return split_sentences(self.source[int(doc_index)]["text"])

    def _random_run(self, doc_index: int, rng: np.random.Generator, n: int) -> list[int] | None:
        """At least `n` tokens (when the document has them) of consecutive sentences from a
        random start in another document of this slice; None if 10 draws find only empty
        documents."""
        own = (doc_index - self.pi) // self.pc
        for _ in range(10):
            j = int(rng.integers(self.local - 1))
            sents = self._sentences(self.pi + (j + (j >= own)) * self.pc)
            if not sents:
                continue
            out: list[int] = []
            for s in sents[int(rng.integers(len(sents))) :]:
                out.extend(self.tok.encode(s))
                if len(out) >= n:
                    break
            if out:
                return out
        return None

    def _row(self, a: list[int], b: list[int] | None, label: int, rng) -> dict[str, np.ndarray]:
        if b is None:  # one segment (`nsp: false`): `[CLS] a [SEP]`, type 0
            ids, types = [self.tok.cls_id, *a, self.tok.sep_id], [0] * (len(a) + 2)
        else:
            ids, types = pair_ids(a, b, self.seq_len, self.tok.cls_id, self.tok.sep_id)
        masked, positions, targets = choose_masks(
            ids, rng, mask_prob=self.cfg.mask_prob, max_predictions=self.m,
            special_V=self.special_V, continuation_V=self.continuation_V,
            mask_id=self.tok.mask_id,
        )  # fmt: skip
        n, k, pad = len(ids), len(positions), self.seq_len - len(ids)
        return {
            "tokens": np.pad(masked, (0, pad)),
            "token_types": np.pad(np.asarray(types, np.int32), (0, pad)),
            "segment_ids": np.pad(np.ones(n, np.int32), (0, pad)),
            "mask_positions": np.pad(positions, (0, self.m - k)),
            "mask_targets": np.pad(targets, (0, self.m - k)),
            "mask_weights": np.pad(np.ones(k, np.float32), (0, self.m - k)),
            "nsp_labels": np.int32(label),
            "nsp_weights": np.float32(1.0),
        }


class _Rows(grain.experimental.FlatMapTransform):
    """A document's list of rows → the rows, one element each."""

    max_fan_out = 1 << 16

    def flat_map(self, rows: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        return rows


def make_mlm_dataset(
    shards: Sequence[Path],
    tok: WordPieceTokenizer,
    loader: LoaderConfig,
    cfg: MLMConfig,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    repeat: bool = True,
) -> grain.IterDataset:
    """Training batches of this process (B = batch_size // process_count rows): endless and
    reshuffled each epoch with `repeat`, fresh masks and pairs every epoch."""
    source = _source(shards)
    docs = grain.MapDataset.range(len(source))[process_index::process_count]
    if loader.shuffle:
        docs = docs.shuffle(seed=_grain_seed(seed))
    if repeat:
        docs = docs.repeat()
    maker = PairMaker(source, tok, cfg, loader.seq_len, process_index, process_count,
                      _where(shards))  # fmt: skip
    rows = _rows(docs, maker, loader, seed)
    if loader.shuffle:
        rows = grain.experimental.WindowShuffleIterDataset(
            rows, window_size=_SHUFFLE_WINDOW, seed=_grain_seed(seed + 1)
        )
    return _batches(rows, loader, cfg, process_count)


def make_mlm_eval_dataset(
    shards: Sequence[Path],
    tok: WordPieceTokenizer,
    loader: LoaderConfig,
    cfg: MLMConfig,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_batches: int | None = None,
) -> grain.IterDataset:
    """Held-out batches: one ordered pass with the same pairs and masks every time (seeded),
    the last batch padded (weights 0); topped up with empty batches to `num_batches`."""
    source = _source(shards)
    docs = grain.MapDataset.range(len(source))[process_index::process_count]
    maker = PairMaker(source, tok, cfg, loader.seq_len, process_index, process_count,
                      _where(shards))  # fmt: skip
    batches = _batches(_rows(docs, maker, loader, seed), loader, cfg, process_count)
    if num_batches is not None:
        empty = _empty_batch(local_batch_size(loader, process_count), loader.seq_len, cfg)
        batches = _PadBatchesIterDataset(batches, num_batches, empty)
    return batches


def _where(shards: Sequence[Path]) -> str:
    """The split the shards are, for messages: `split 'val' (<data_dir>/val/shard-*.jsonl)`."""
    folders = sorted({str(Path(s).parent) for s in shards})
    if len(folders) != 1:
        return ", ".join(map(str, shards))
    return f"split '{Path(folders[0]).name}' ({folders[0]}/shard-*.jsonl)"


def _source(shards: Sequence[Path]) -> JsonlSource:
    if not shards:
        raise DataError("no JSONL shards given; expected <data_dir>/<split>/shard-*.jsonl")
    return JsonlSource(shards, require=("text",))


def _rows(docs: grain.MapDataset, maker: PairMaker, loader: LoaderConfig, seed: int):
    """Each document's rows, one element each (made in grain's read threads)."""
    read = grain.ReadOptions(num_threads=loader.num_threads, prefetch_buffer_size=_DOC_PREFETCH)
    per_doc = docs.random_map(maker, seed=_grain_seed(seed + 2)).to_iter_dataset(read)
    return grain.experimental.FlatMapIterDataset(per_doc, _Rows())


def _batches(rows, loader: LoaderConfig, cfg: MLMConfig, process_count: int):
    n = local_batch_size(loader, process_count)
    empty = _empty_batch(n, loader.seq_len, cfg)
    batches = rows.batch(n, drop_remainder=False).map(lambda b: fill_batch(b, empty))
    return finish_batches(batches, loader)


def _empty_batch(rows: int, seq_len: int, cfg: MLMConfig) -> Batch:
    """All-padding rows: every weight 0, so they add nothing to a loss or a figure."""
    m = max_predictions(cfg, seq_len)
    out: Batch = {k: np.zeros((rows, seq_len), np.int32)
                  for k in ("tokens", "token_types", "segment_ids")}  # fmt: skip
    out.update({k: np.zeros((rows, m), np.int32) for k in ("mask_positions", "mask_targets")})
    out["mask_weights"] = np.zeros((rows, m), np.float32)
    out["nsp_labels"] = np.zeros(rows, np.int32)
    out["nsp_weights"] = np.zeros(rows, np.float32)
    return out
