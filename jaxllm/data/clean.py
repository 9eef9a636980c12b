"""Text normalisation and the document quality filters of `FilterConfig`.

Corpus texts are wrapped as "<s>…</s>"; `strip_markers` removes the wrapper so normalisation and
filters see only the document. Everything per character runs in C (`str` methods, numpy): a
Python loop over characters (or even `re`, ~10x slower than split/join here) would cap curation
well below its 20 MB/s-per-core target.

Character classes, used by the non-letter and script filters and to pick the n-gram unit:

* letter: Unicode categories L* (letters, including CJK ideographs, kana and hangul) and M*
  (combining marks, so Devanagari vowel signs or a leftover accent count with their letter);
* whitespace: `str.isspace()`;
* other: everything else (digits, punctuation, symbols, controls).

A letter's script comes from the code-point ranges in `SCRIPT_RANGES` (searchsorted over the
range starts, done once for all code points into a 1.1 MB uint8 class table, so a document costs
one table lookup per character); letters outside them are script "other".
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Sequence

import numpy as np

from jaxllm.config import FilterConfig
from jaxllm.errors import ConfigError

BOS, EOS = "<s>", "</s>"

# Inclusive code-point ranges per script. Ranges may include non-letters (digits, punctuation):
# only letters are classified, so a generous block range is safe.
SCRIPT_RANGES: dict[str, tuple[tuple[int, int], ...]] = {
    # Basic Latin through IPA, spacing modifiers and combining diacritics, plus extended
    # blocks and fullwidth A-Z/a-z.
    "latin": ((0x0041, 0x036F), (0x1D00, 0x1DFF), (0x1E00, 0x1EFF), (0x2C60, 0x2C7F),
              (0xA720, 0xA7FF), (0xAB30, 0xAB6F), (0xFB00, 0xFB06), (0xFF21, 0xFF5A)),
    "greek": ((0x0370, 0x03FF), (0x1F00, 0x1FFF)),
    "cyrillic": ((0x0400, 0x052F), (0x1C80, 0x1C8F), (0x2DE0, 0x2DFF), (0xA640, 0xA69F)),
    "hebrew": ((0x0590, 0x05FF), (0xFB1D, 0xFB4F)),
    "arabic": ((0x0600, 0x06FF), (0x0750, 0x077F), (0x0870, 0x08FF), (0xFB50, 0xFDFF),
               (0xFE70, 0xFEFF)),
    "devanagari": ((0x0900, 0x097F), (0xA8E0, 0xA8FF)),
    "thai": ((0x0E00, 0x0E7F),),
    "hangul": ((0x1100, 0x11FF), (0x3130, 0x318F), (0xA960, 0xA97F), (0xAC00, 0xD7FF),
               (0xFFA0, 0xFFDC)),
    "kana": ((0x3040, 0x30FF), (0x31F0, 0x31FF), (0x32D0, 0x32FE), (0xFF66, 0xFF9D),
             (0x1B000, 0x1B16F)),
    "han": ((0x2E80, 0x2FDF), (0x3005, 0x3007), (0x3021, 0x3029), (0x3038, 0x303B),
            (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x3134F)),
}  # fmt: skip
SCRIPTS = tuple(SCRIPT_RANGES)
# Scripts written without spaces between words: their n-grams are character n-grams.
UNSPACED_SCRIPTS = frozenset({"han", "kana", "thai"})

# Character class codes: a letter of SCRIPTS[i] has class _FIRST_SCRIPT + i.
_OTHER, _SPACE, _OTHER_LETTER, _FIRST_SCRIPT = 0, 1, 2, 3
_NCLASS = _FIRST_SCRIPT + len(SCRIPTS)
_NCODE = 0x110000
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant for polynomial hashes
_MAX_POW = 1 << 18  # longest text (chars) whose word keys use the vectorised prefix hash


def strip_markers(text: str) -> str:
    """The document inside an optional `<s>…</s>` wrapper (both or neither: a text that only
    starts with an HTML `<s>` tag keeps it)."""
    text = text.strip()
    if text.startswith(BOS) and text.endswith(EOS) and len(text) >= len(BOS) + len(EOS):
        text = text[len(BOS) : -len(EOS)]
    return text


def normalize(text: str) -> str:
    """NFC, `\\r\\n`/`\\r` → `\\n`, no trailing spaces on lines, at most one blank line in a
    row, no leading/trailing whitespace. Idempotent."""
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    # split/rstrip/join runs at memcpy speed; a regex for trailing spaces scans ~10x slower.
    text = "\n".join(map(str.rstrip, text.split("\n")))
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.strip()


def code_points(text: str) -> np.ndarray:
    """The text's code points as uint32 (lone surrogates pass through as their value)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)


@functools.cache
def _class_table() -> np.ndarray:
    """uint8 class of every code point (built once, ~0.4 s): searchsorted over the script
    ranges is done here for all letters, so each document needs one table lookup per char."""
    letter = np.zeros(_NCODE, bool)
    space = np.zeros(_NCODE, bool)
    for lo in range(0, _NCODE, 1 << 16):  # one plane at a time keeps the peak memory small
        chars = "".join(map(chr, range(lo, lo + (1 << 16))))
        letter[lo : lo + (1 << 16)] = np.fromiter(map(str.isalpha, chars), bool, 1 << 16)
        space[lo : lo + (1 << 16)] = np.fromiter(map(str.isspace, chars), bool, 1 << 16)
    # Combining marks (category M*) live in planes 0, 1 and 14; skip the unassigned rest.
    cand = np.flatnonzero(~letter & ~space)
    cand = cand[(cand < 0x20000) | ((cand >= 0xE0000) & (cand < 0xE1000))].tolist()
    marks = [c for c in cand if unicodedata.category(chr(c))[0] == "M"]
    letter[marks] = True

    spans = [(lo, hi, i) for i, s in enumerate(SCRIPTS) for lo, hi in SCRIPT_RANGES[s]]
    lo, hi, sid = (np.array(x, np.int64) for x in zip(*sorted(spans)))
    cps = np.flatnonzero(letter)
    at = np.maximum(np.searchsorted(lo, cps, side="right") - 1, 0)
    inside = (cps >= lo[at]) & (cps <= hi[at])
    table = np.full(_NCODE, _OTHER, np.uint8)
    table[space] = _SPACE
    table[cps] = np.where(inside, _FIRST_SCRIPT + sid[at], _OTHER_LETTER)
    return table


def char_classes(text: str) -> np.ndarray:
    """uint8 class per character (see the module docstring)."""
    return _class_table()[code_points(text)]


def class_counts(classes: np.ndarray) -> list[int]:
    """Counts per class: [other, whitespace, other-script letters, *SCRIPTS letters]. A list:
    the few sums on it are cheaper in Python than as numpy calls."""
    return np.bincount(classes, minlength=_NCLASS).tolist()


def non_letter_frac(counts: Sequence[int]) -> float:
    """Share of non-whitespace characters that are not letters (digits, punctuation, symbols).
    Whitespace is neither letter nor non-letter: it counts in neither numerator nor denominator.
    """
    visible = sum(counts) - counts[_SPACE]
    return counts[_OTHER] / visible if visible else 0.0


def script_shares(counts: Sequence[int]) -> dict[str, float]:
    """Share of the letters in each script ("other" for letters outside `SCRIPT_RANGES`)."""
    letters = counts[_OTHER_LETTER:]
    total = sum(letters)
    return {n: c / total for n, c in zip(("other", *SCRIPTS), letters) if c} if total else {}


def dominant_script(counts: Sequence[int]) -> str | None:
    """The script with the most letters ("other" only if it beats every listed script; ties go
    to the first in `SCRIPTS`); None for a text without letters."""
    scripts = counts[_FIRST_SCRIPT:]
    top = max(scripts)
    if top == 0 and counts[_OTHER_LETTER] == 0:
        return None
    return "other" if counts[_OTHER_LETTER] > top else SCRIPTS[scripts.index(top)]


def repeated_line_frac(text: str) -> float:
    """Share of non-empty lines (compared stripped) that repeat an earlier line."""
    lines = list(filter(None, map(str.strip, text.split("\n"))))
    return 1.0 - len(set(lines)) / len(lines) if lines else 0.0


def top_ngram_frac(
    text: str, n: int, classes: np.ndarray | None = None, script: str | None = None
) -> float:
    """Share of all n-gram occurrences taken by the most frequent n-gram.

    Text whose dominant script is written without spaces (`UNSPACED_SCRIPTS`: han, kana, thai)
    uses character n-grams over its non-whitespace characters; all other text uses n-grams of
    whitespace-separated words. Fewer than n units → 0.0 (nothing repeats). The filter drops a
    text only if this exceeds the limit and the top n-gram occurs at least twice."""
    cps = code_points(text)
    classes = _class_table()[cps] if classes is None else classes
    grams = _sorted_ngrams(text, n, cps, classes, script)
    if len(grams) == 0:
        return 0.0
    starts = np.flatnonzero(grams[1:] != grams[:-1])
    runs = np.diff(np.concatenate(([-1], starts, [len(grams) - 1])))
    return int(runs.max()) / len(grams)


@functools.cache
def _powers() -> tuple[np.ndarray, np.ndarray]:
    """M^i and M^-i (mod 2^64) for i < _MAX_POW: 2 x 2 MiB, built once."""
    inv = np.uint64(pow(int(_MULT), -1, 1 << 64))
    pw = np.cumprod(np.full(_MAX_POW, _MULT, np.uint64)) * inv  # M^i: cumprod starts at M^1
    ipw = np.cumprod(np.full(_MAX_POW, inv, np.uint64)) * _MULT
    return pw, ipw


def _word_keys(cps: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """uint64 key per whitespace-separated word (as `str.split()` cuts them), equal for equal
    words, without making a Python string per word (which costs ~3x more): the polynomial hash
    sum(c_i M^i) of a word is (P[end] - P[start]) * M^-start, P the prefix sums over the text."""
    pw, ipw = _powers()
    n = len(cps)
    prefix = np.zeros(n + 1, np.uint64)
    np.cumsum(np.multiply(cps, pw[:n], dtype=np.uint64), out=prefix[1:])
    inside = np.zeros(n + 2, np.int8)
    inside[1:-1] = classes != _SPACE
    edges = np.flatnonzero(inside[1:] != inside[:-1])
    starts, ends = edges[0::2], edges[1::2]
    return (prefix[ends] - prefix[starts]) * ipw[starts]


def _top_ngram_exceeds(grams: np.ndarray, limit: float) -> bool:
    """The filter's rule: top_ngram_frac > limit AND the top n-gram occurs at least twice (a
    short text whose n-grams are all distinct has share 1/m, which says nothing about
    repetition). Two numpy calls on the sorted keys: with k the largest count for which
    k / m <= limit (at least 1), some n-gram exceeds iff a sorted run spans k + 1 entries."""
    m = len(grams)
    k = int(limit * m)
    while k > 0 and k / m > limit:  # float rounding: k / m must compare exactly like the frac
        k -= 1
    while k < m and (k + 1) / m <= limit:
        k += 1
    k = max(k, 1)
    return k < m and bool(np.any(grams[k:] == grams[:-k]))


def _sorted_ngrams(
    text: str, n: int, cps: np.ndarray, classes: np.ndarray, script: str | None
) -> np.ndarray:
    """Sorted uint64 keys of the text's n-grams (see `top_ngram_frac` for the unit rule)."""
    script = dominant_script(class_counts(classes)) if script is None else script
    if script in UNSPACED_SCRIPTS:
        keys = cps[classes != _SPACE].astype(np.uint64)
    elif len(cps) <= _MAX_POW:
        keys = _word_keys(cps, classes)
    else:
        words = text.split()
        keys = np.fromiter(map(hash, words), np.int64, len(words)).view(np.uint64)
    m = len(keys) - n + 1
    if m <= 0:
        return np.zeros(0, np.uint64)
    grams = keys[:m].copy()
    for j in range(1, n):
        grams *= _MULT
        grams ^= keys[j : j + m]
    grams.sort()
    return grams


class QualityFilter:
    """The `FilterConfig` filters; calling it returns the name of the first filter a document
    fails (the config key to relax, e.g. "max_non_letter_frac") or None if it passes."""

    def __init__(self, cfg: FilterConfig) -> None:
        unknown = [s for s in cfg.scripts if s not in SCRIPTS]
        if unknown:
            raise ConfigError(
                f"config key 'data.filters.scripts': unknown script {unknown[0]!r} "
                f"(known: {', '.join(SCRIPTS)})"
            )
        self.cfg = cfg
        self._allowed = [s in cfg.scripts for s in ("other", *SCRIPTS)]
        self._ngram = cfg.max_top_ngram_frac < 1.0
        self._classes = cfg.max_non_letter_frac < 1.0 or bool(cfg.scripts) or self._ngram

    def __call__(self, text: str) -> str | None:
        cfg = self.cfg
        if len(text) < cfg.min_chars:
            return "min_chars"
        if len(text) > cfg.max_chars:
            return "max_chars"
        cps, classes, script = None, None, None
        if self._classes:
            cps = code_points(text)
            classes = _class_table()[cps]
            counts = class_counts(classes)
            script = dominant_script(counts)
            if non_letter_frac(counts) > cfg.max_non_letter_frac:
                return "max_non_letter_frac"
            if cfg.scripts:
                reason = self._script_reason(counts, script)
                if reason:
                    return reason
        limit = cfg.max_repeated_line_frac
        if limit < 1.0 and repeated_line_frac(text) > limit:
            return "max_repeated_line_frac"
        if self._ngram:
            grams = _sorted_ngrams(text, cfg.top_ngram_n, cps, classes, script or "")
            if _top_ngram_exceeds(grams, cfg.max_top_ngram_frac):
                return "max_top_ngram_frac"
        return None

    def _script_reason(self, counts: list[int], script: str | None) -> str | None:
        """Dominant script must be allowed, and allowed letters >= min_script_frac of letters.
        A document without letters has no script and fails."""
        if script not in self.cfg.scripts:
            return "scripts"
        letters = counts[_OTHER_LETTER:]
        allowed = sum(c for c, ok in zip(letters, self._allowed) if ok)
        if allowed < self.cfg.min_script_frac * sum(letters):
            return "min_script_frac"
        return None
