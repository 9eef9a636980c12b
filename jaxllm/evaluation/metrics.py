"""Evaluation metrics as plain functions of numbers and strings (numpy-reference tested).

- `choice_accuracy`: lm-evaluation-harness's multiple-choice `acc` and `acc_norm`: the
  prediction is the argmax of the choices' summed log-likelihoods (`acc`) or of those
  divided by each choice's length in characters, the choice string itself without the
  target delimiter (`acc_norm`); ties go to the first choice (`np.argmax`).
- `brier_score`: lm-eval's too: the squared distance between the softmax of the choices'
  log-likelihoods and the one-hot answer, summed over the choices (0 is perfect, 1 - 1/n a
  uniform guess among n); a continuous score of the same question, which moves where an
  accuracy near chance cannot (Schaeffer et al. 2023, "Are Emergent Abilities of Large
  Language Models a Mirage?").
- `pass_at_k`: Chen et al. (2021)'s unbiased estimator 1 - C(n-c, k) / C(n, k) from n
  samples of which c are correct, as a numerically stable product.
- `mean_stderr`: the standard error of a mean, sample std (ddof 1) / sqrt(n), as lm-eval.
- answer checks: `exact` (after stripping whitespace), `contains`, and `regex` extraction
  (the first group of the last match, e.g. the number after `</think>`).
- perplexity figures from summed log-likelihoods, and lm-eval's rolling windows for texts
  longer than the context.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import numpy as np


def choice_accuracy(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    """`acc` and `acc_norm` of one question (1.0 or 0.0 each)."""
    lls_C = np.asarray(lls, np.float64)
    chars_C = np.asarray([float(len(c)) for c in choices])
    return {
        "acc": float(int(np.argmax(lls_C)) == gold),
        "acc_norm": float(int(np.argmax(lls_C / chars_C)) == gold),
    }


def brier_score(lls: Sequence[float], gold: int) -> float:
    """The Brier score of one question: sum over choices of (softmax(lls) - one_hot(gold))^2."""
    lls_C = np.asarray(lls, np.float64)
    p_C = np.exp(lls_C - lls_C.max())
    p_C /= p_C.sum()
    p_C[gold] -= 1.0
    return float(np.sum(p_C**2))


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n is correct), c correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of the mean (None for fewer than two values)."""
    if len(values) < 2:
        return None
    return float(np.std(np.asarray(values, np.float64), ddof=1) / math.sqrt(len(values)))


def _exact(answer: str, refs: Sequence[str]) -> bool:
    return answer.strip() in {r.strip() for r in refs}


def _contains(answer: str, refs: Sequence[str]) -> bool:
    return any(r.strip() and r.strip() in answer for r in refs)


MATCHES: dict[str, Callable[[str, Sequence[str]], bool]] = {"exact": _exact, "contains": _contains}


def extract(text: str, pattern: str) -> str | None:
    """The first group (or whole match) of the last match of `pattern` in `text`, else None."""
    found = list(re.finditer(pattern, text))
    if not found:
        return None
    m = found[-1]
    return m.group(1) if m.groups() else m.group(0)


def perplexity_figures(logprob: float, tokens: int, chars: int, nbytes: int) -> dict[str, float]:
    """Token perplexity, bits per byte / per character and byte perplexity (lm-eval's
    `byte_perplexity` and `bits_per_byte`) from a summed natural-log likelihood."""
    nats = -logprob
    return {
        "token_perplexity": math.exp(nats / tokens),
        "bits_per_byte": nats / nbytes / math.log(2),
        "byte_perplexity": math.exp(nats / nbytes),
        "bits_per_char": nats / chars / math.log(2),
    }


def rolling_windows(
    ids: Sequence[int], prefix: int, max_len: int
) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that together score every token of `ids` once, each
    predicting up to `max_len` tokens from a model input of `max_len` (context + continuation
    <= `max_len` + 1: the last token is only predicted): the first continuation follows
    `prefix` (a BOS), later ones take as much preceding text as context as fits (lm-eval's
    `get_rolling_token_windows` with context_len 1, then `make_disjoint_window`)."""
    out, start = [], 0
    while start < len(ids):
        end = min(start + max_len, len(ids))
        ctx = [prefix, *ids[:start]][-(max_len + 1 - (end - start)) :]
        out.append((ctx, list(ids[start:end])))
        start = end
    return out
