"""Retrieval for retrieval-augmented prompts: an index over a passage store (JSONL, gzip ok,
one `{"id", "text"}` per line) — BM25 (`bm25s`) or dense (cosine similarity of an encoder's
sentence vectors) — top-k passages per question, recall@k against a gold passage id, and the
passages placed into a prompt within a token budget.

BM25 terms: words of letters, digits and combining marks in any script (NFKC-normalised and
case-folded: "Müller" and "MÜLLER" are one term; Cyrillic, Greek, Hangul, Devanagari alike;
ASCII text gives exactly the lower-cased `[0-9a-z]+` runs), and each CJK ideograph on its own
(classical Chinese has no spaces; a character is the usual unit of Chinese BM25), so one index
serves the English and Chinese passages of the shipped corpus alike. Other scripts written
without spaces (Thai, Japanese kana) give one term per unbroken run.

Dense: the passages and the queries are embedded by an `Embed` function the caller supplies
(`stage: eval` gives the embed stage's mean-pooled encoder vectors, `trainers/embedder.py`); the
top k are the passages of highest cosine similarity, ties to the lower index.
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from jaxllm.errors import ConfigError, DataError
from jaxllm.jsonl import read_jsonl

_CJK = "\u3400-\u9fff\uf900-\ufaff\U00020000-\U0003134f"  # ideographs: a term each


def _mark_ranges() -> str:
    """A character class body of every combining mark (Unicode category M), which `\\w`
    leaves out: Devanagari's vowel signs, decomposed accents."""
    marks = [c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c))[0] == "M"]
    runs, start = [], marks[0]
    for a, b in zip(marks, marks[1:] + [-1]):
        if b != a + 1:
            runs.append(f"\\U{start:08x}-\\U{a:08x}")
            start = b
    return "".join(runs)


@functools.cache
def _terms_re() -> re.Pattern[str]:
    return re.compile(f"[{_CJK}]|(?:[^\\W_{_CJK}]|[{_mark_ranges()}])+")


def terms(text: str) -> list[str]:
    """BM25 terms of a text: case-folded words of any script, each CJK ideograph alone."""
    return _terms_re().findall(unicodedata.normalize("NFKC", text).casefold())


class BM25Index:
    """Passages and their BM25 index (k1 1.5, b 0.75, Lucene's idf: bm25s's defaults)."""

    def __init__(self, ids: Sequence[str], texts: Sequence[str], source: str = "passages"):
        import bm25s

        if not texts:
            raise DataError(f"{source}: the passage store is empty; nothing to retrieve from")
        self.ids, self.texts, self.source = list(ids), list(texts), source
        self.index = bm25s.BM25()
        self.index.index([terms(t) or ["<empty>"] for t in texts], show_progress=False)

    def search(self, queries: Sequence[str], k: int) -> list[list[int]]:
        """The indices of the top-k passages per query, best first (a query with no known
        term gets no passages)."""
        k = min(k, len(self.texts))
        asked = [terms(q) for q in queries]
        found: list[list[int]] = [[] for _ in asked]
        # A query without terms is not searched: it would match the placeholder term of the
        # passages without terms.
        some = [i for i, t in enumerate(asked) if t]
        if some:
            docs, scores = self.index.retrieve([asked[i] for i in some], k=k, show_progress=False)
            for i, row, srow in zip(some, docs, scores):
                found[i] = [int(d) for d, s in zip(row, srow) if s > 0]
        return found


def read_passages(path: Path, id_field: str = "id", text_field: str = "text"):
    """(ids, texts) of a passage store; a line without the text names `file:line`."""
    ids, texts = [], []
    for n, obj in read_jsonl(path):
        if not isinstance(obj.get(text_field), str):
            raise DataError(f'{path}:{n}: expected a "{text_field}" string')
        ids.append(str(obj.get(id_field, n)))
        texts.append(obj[text_field])
    return ids, texts


Embed = Callable[[Sequence[str]], np.ndarray]  # texts → [len(texts), D] vectors


def cosine_top_k(queries_QD: np.ndarray, passages_ND: np.ndarray, k: int) -> np.ndarray:
    """[Q, min(k, N)] passage indices by cosine similarity, best first (ties: lower index).
    Zero vectors have similarity 0 with everything."""
    q = queries_QD / np.maximum(np.linalg.norm(queries_QD, axis=-1, keepdims=True), 1e-12)
    p = passages_ND / np.maximum(np.linalg.norm(passages_ND, axis=-1, keepdims=True), 1e-12)
    sim_QN = q.astype(np.float32) @ p.astype(np.float32).T
    return np.argsort(-sim_QN, axis=1, kind="stable")[:, : max(k, 0)]


class DenseIndex:
    """Passages as sentence vectors (`embed`); a query's top k by cosine similarity."""

    def __init__(self, ids: Sequence[str], texts: Sequence[str], embed: Embed,
                 source: str = "passages"):  # fmt: skip
        if not texts:
            raise DataError(f"{source}: the passage store is empty; nothing to retrieve from")
        self.ids, self.texts, self.source, self.embed = list(ids), list(texts), source, embed
        self.vectors_ND = np.asarray(embed(self.texts), np.float32)

    def search(self, queries: Sequence[str], k: int) -> list[list[int]]:
        vecs = np.asarray(self.embed(list(queries)), np.float32)
        return [[int(j) for j in row] for row in cosine_top_k(vecs, self.vectors_ND, k)]


@functools.lru_cache(maxsize=4)
def cached_index(
    path: str, id_field: str, text_field: str, embed: Embed | None = None
) -> BM25Index | DenseIndex:
    """One index per passage store (and encoder) per process: tasks and variants share it.
    BM25 without `embed`, dense with it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"retrieval passages: {p} not found")
    ids, texts = read_passages(p, id_field, text_field)
    return BM25Index(ids, texts, str(p)) if embed is None else DenseIndex(ids, texts, embed, str(p))


def recall_at_k(retrieved: Sequence[Sequence[str]], gold: Sequence[str], k: int) -> list[float]:
    """Per question, 1.0 when its gold passage id is among the first k retrieved."""
    return [float(g in list(r)[:k]) for r, g in zip(retrieved, gold)]


def place_passages(
    passages: Sequence[str], render: Callable[[str], str], fits: Callable[[str], bool]
) -> tuple[str, int]:
    """The prompt with as many passages (in rank order) as fit, and how many were dropped:
    `render(context)` builds the prompt, `fits(prompt)` says whether it fits the context."""
    for n in range(len(passages), -1, -1):
        prompt = render("".join(passages[:n]))
        if n == 0 or fits(prompt):
            return prompt, len(passages) - n
    raise AssertionError("unreachable")


def mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else float("nan")
