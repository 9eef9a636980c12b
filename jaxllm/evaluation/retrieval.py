"""Retrieval for retrieval-augmented prompts: a BM25 index (`bm25s`) over a passage store
(JSONL, gzip ok, one `{"id", "text"}` per line), top-k passages per question, recall@k
against a gold passage id, and the passages placed into a prompt within a token budget.

Terms: lower-cased Latin words and digits, and each CJK character on its own (classical
Chinese has no spaces; a character is the usual unit of Chinese BM25), so one index serves
the English and Chinese passages of the shipped corpus alike.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from jaxllm.errors import ConfigError, DataError
from jaxllm.jsonl import read_jsonl

_TERMS = re.compile(r"[0-9a-z]+|[\u3400-\u9fff\uf900-\ufaff]")


def terms(text: str) -> list[str]:
    return _TERMS.findall(text.lower())


class BM25Index:
    """Passages and their BM25 index (k1 1.5, b 0.75, Lucene's idf: bm25s's defaults)."""

    def __init__(self, ids: Sequence[str], texts: Sequence[str], source: str = "passages"):
        import bm25s

        if not texts:
            raise DataError(f"{source}: the passage store is empty; nothing to retrieve from")
        self.ids, self.texts, self.source = list(ids), list(texts), source
        self.index = bm25s.BM25()
        self.index.index([terms(t) or ["<empty>"] for t in texts], show_progress=False)

    @classmethod
    def from_jsonl(cls, path: Path, id_field: str = "id", text_field: str = "text") -> BM25Index:
        ids, texts = [], []
        for n, obj in read_jsonl(path):
            if not isinstance(obj.get(text_field), str):
                raise DataError(f'{path}:{n}: expected a "{text_field}" string')
            ids.append(str(obj.get(id_field, n)))
            texts.append(obj[text_field])
        return cls(ids, texts, str(path))

    def search(self, queries: Sequence[str], k: int) -> list[list[int]]:
        """The indices of the top-k passages per query, best first (a query with no known
        term gets no passages)."""
        k = min(k, len(self.texts))
        docs, scores = self.index.retrieve(
            [terms(q) or ["<empty>"] for q in queries], k=k, show_progress=False
        )
        return [[int(d) for d, s in zip(row, srow) if s > 0] for row, srow in zip(docs, scores)]


@functools.lru_cache(maxsize=4)
def cached_index(path: str, id_field: str, text_field: str) -> BM25Index:
    """One index per passage store per process (tasks and variants share it)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"retrieval passages: {p} not found")
    return BM25Index.from_jsonl(p, id_field, text_field)


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
