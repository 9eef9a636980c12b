"""Degeneration measures of generated answers, on whitespace words (tokenizer-independent):
the share of repeated n-grams within an answer, distinct-n and a well-formed test. An RL
policy that games its reward model drifts into repetition within an answer ("not not not
..."), measured per answer and averaged, or into one answer for every prompt, which
distinct-n over all answers together (Li et al., 2016) shows. Pure Python.
"""

from __future__ import annotations

from collections.abc import Sequence

_SENTENCE_END = tuple(".!?。！？")


def ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """The n-grams of a word sequence, in order ([] when it has fewer than n words)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def repeated_ngram_share(words: Sequence[str], n: int = 3) -> float:
    """Share of the n-grams that repeat one seen earlier in the same sequence: 0 for no
    repetition, (k - 1) / k for one n-gram said k times; 0 when there is no n-gram."""
    grams = ngrams(words, n)
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def distinct_n(words: Sequence[str], n: int = 2) -> float:
    """Distinct n-grams / n-grams of one sequence (1: no n-gram repeats); 1 when there is
    no n-gram, since nothing repeats."""
    grams = ngrams(words, n)
    return len(set(grams)) / len(grams) if grams else 1.0


def corpus_distinct_n(answers: Sequence[Sequence[str]], n: int = 2) -> float:
    """Distinct n-grams over all answers / all their n-grams (1 when there is none): low
    when answers repeat themselves or one another."""
    grams = [g for words in answers for g in ngrams(words, n)]
    return len(set(grams)) / len(grams) if grams else 1.0


def well_formed(text: str) -> bool:
    """A non-empty answer that ends a sentence (. ! ? or their CJK forms) and repeats no
    word 3-gram: what a fluent short answer looks like, and what a truncated or looping
    one does not."""
    words = text.split()
    return bool(words) and text.rstrip().endswith(_SENTENCE_END) and not has_repeat(words)


def has_repeat(words: Sequence[str], n: int = 3) -> bool:
    return repeated_ngram_share(words, n) > 0


def answer_quality(texts: Sequence[str]) -> dict[str, float]:
    """`repeat_3gram` (repeated word 3-gram share within an answer, mean over answers),
    `distinct_2` (distinct word bigrams over all answers together), `well_formed` (the
    share of well-formed answers) and `distinct_answers` (different answers / answers, words
    compared: 1 / n when every prompt gets the same answer)."""
    if not texts:
        return {}
    words = [t.split() for t in texts]
    n = len(texts)
    return {
        "repeat_3gram": round(sum(repeated_ngram_share(w, 3) for w in words) / n, 4),
        "distinct_2": round(corpus_distinct_n(words, 2), 4),
        "well_formed": round(sum(well_formed(t) for t in texts) / n, 4),
        "distinct_answers": round(len({" ".join(w) for w in words}) / n, 4),
    }
