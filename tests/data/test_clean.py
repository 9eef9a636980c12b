"""Normalisation and quality filters: each filter on hand-made text on both sides of its limit."""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm.config import FilterConfig
from jaxllm.data import clean
from jaxllm.data.clean import (
    QualityFilter,
    char_classes,
    class_counts,
    dominant_script,
    non_letter_frac,
    normalize,
    repeated_line_frac,
    script_shares,
    strip_markers,
    top_ngram_frac,
)
from jaxllm.errors import ConfigError


def counts(text: str) -> list[int]:
    return class_counts(char_classes(text))


def reason(text: str, **filters) -> str | None:
    return QualityFilter(FilterConfig(**filters))(text)


# ----------------------------------------------------------------------------- normalisation


def test_nfc_composes_combining_marks():
    assert normalize("cafe\u0301") == "caf\u00e9"
    assert normalize("\u1100\u1161") == "\uac00"  # Hangul jamo compose to one syllable


def test_normalize_newlines_spaces_and_blank_runs():
    raw = "  a \t\r\nb\rc\u3000\n\n\n\n \nd  \n\n"
    assert normalize(raw) == "a\nb\nc\n\nd"
    assert normalize(normalize(raw)) == normalize(raw)  # idempotent
    assert normalize("x\n\ny") == "x\n\ny"  # one blank line is kept


def test_strip_markers():
    assert strip_markers("<s>hello</s>") == "hello"
    assert strip_markers(" <s>a <s> b</s>\n") == "a <s> b"
    assert strip_markers("no markers") == "no markers"
    assert strip_markers("<s>Was $20</s> now $10") == "<s>Was $20</s> now $10"  # an HTML tag
    assert strip_markers("<s></s>") == "" and strip_markers("<s>") == "<s>"


# ----------------------------------------------------------------------------- filters


def test_length_filters():
    assert reason("abcd", min_chars=5) == "min_chars"
    assert reason("abcde", min_chars=5) is None
    assert reason("abcdef", max_chars=5) == "max_chars"
    assert reason("abcde", max_chars=5) is None


def test_non_letter_fraction_ignores_whitespace():
    assert non_letter_frac(counts("ab 12")) == pytest.approx(0.5)
    assert non_letter_frac(counts("a b c")) == 0.0
    assert non_letter_frac(counts("你好，世界。")) == pytest.approx(2 / 6)
    assert non_letter_frac(counts("e\u0301")) == 0.0  # a combining mark counts as a letter
    assert reason("ab 12", max_non_letter_frac=0.4) == "max_non_letter_frac"
    assert reason("abc 12", max_non_letter_frac=0.4) is None  # 2/5 == limit: kept
    assert reason("你好，世界。", max_non_letter_frac=0.3) == "max_non_letter_frac"
    assert reason("你好，世界。", max_non_letter_frac=0.34) is None


def test_repeated_lines():
    text = "alpha\nbeta\n\nalpha\n  alpha  "
    assert repeated_line_frac(text) == pytest.approx(2 / 4)  # blank lines are not counted
    assert reason(text, max_repeated_line_frac=0.49) == "max_repeated_line_frac"
    assert reason(text, max_repeated_line_frac=0.5) is None
    assert repeated_line_frac("床前明月光\n疑是地上霜\n床前明月光") == pytest.approx(1 / 3)


def test_top_word_ngram():
    text = "a b a b a b"  # bigrams ab ba ab ba ab: "a b" is 3 of 5
    assert top_ngram_frac(text, 2) == pytest.approx(3 / 5)
    assert top_ngram_frac(text, 1) == pytest.approx(3 / 6)
    assert top_ngram_frac("one two three four", 2) == pytest.approx(1 / 3)
    assert top_ngram_frac("one", 2) == 0.0
    assert reason(text, max_top_ngram_frac=0.59) == "max_top_ngram_frac"
    assert reason(text, max_top_ngram_frac=0.6) is None


def test_top_ngram_needs_a_repeat():
    short = "ACCORD, n. Harmony."  # 2 distinct bigrams: share 1/2, but nothing repeats
    assert top_ngram_frac(short, 2) == pytest.approx(1 / 2)
    assert reason(short, max_top_ngram_frac=0.2) is None
    assert reason("buy buy buy now", max_top_ngram_frac=0.2) == "max_top_ngram_frac"  # 2 of 3


def test_top_ngram_uses_characters_for_chinese():
    poem = "床前明月光疑是地上霜"  # no spaces: 9 distinct character bigrams
    assert top_ngram_frac(poem, 2) == pytest.approx(1 / 9)  # as words: one word, no bigram
    laugh = "哈哈哈哈哈哈，好"  # bigrams (punctuation kept, spaces dropped): 哈哈 is 5 of 7
    assert top_ngram_frac(laugh, 2) == pytest.approx(5 / 7)
    assert reason(laugh, max_top_ngram_frac=0.7) == "max_top_ngram_frac"
    assert reason(poem, max_top_ngram_frac=0.2) is None
    assert top_ngram_frac("你好 你好 你好", 2) == pytest.approx(3 / 5)  # spaces are skipped


def test_fast_ngram_check_matches_the_fraction():
    rng = np.random.default_rng(0)
    for trial in range(300):
        words = rng.choice(["x", "y", "z", "w", "v"][: 2 + trial % 4], rng.integers(1, 40))
        text = " ".join(words)
        n = 1 + trial % 3
        cps = clean.code_points(text)
        classes = clean._class_table()[cps]
        grams = clean._sorted_ngrams(text, n, cps, classes, None)
        frac = top_ngram_frac(text, n)
        top_count = round(frac * len(grams))
        for limit in (0.1, 0.25, 0.5, frac, 0.99):
            want = frac > limit and top_count >= 2
            assert clean._top_ngram_exceeds(grams, limit) == want, (text, n, limit)


def test_word_keys_cut_like_str_split():
    texts = ["a b  a\tb a\u3000b", " lead and trail ", "x", "ü ü é", "a\x1fb a\x1fb"]
    for text in texts:
        keys = clean._word_keys(clean.code_points(text), char_classes(text)).tolist()
        words = text.split()
        assert len(keys) == len(words)
        assert len(set(keys)) == len(set(words))
        assert len(set(zip(words, keys))) == len(set(words))


@pytest.mark.parametrize(
    ("text", "script"),
    [
        ("Hello wörld", "latin"),
        ("你好世界", "han"),
        ("こんにちは世界", "kana"),  # 5 kana beat 2 han
        ("Привет мир", "cyrillic"),
        ("Γειά σου κόσμε", "greek"),
        ("مرحبا بالعالم", "arabic"),
        ("안녕하세요 세계", "hangul"),
        ("1234 !!", None),
    ],
)
def test_dominant_script(text, script):
    assert dominant_script(counts(text)) == script


def test_script_filter():
    assert reason("Hello world", scripts=("latin",)) is None
    assert reason("Hello world", scripts=("han",)) == "scripts"
    assert reason("你好世界", scripts=("latin", "han")) is None
    assert reason("Привет мир", scripts=("latin", "han")) == "scripts"
    assert reason("1234", scripts=("latin",)) == "scripts"  # no letters, no script
    mixed = "你好世界你好 abc"  # han 6, latin 3
    assert script_shares(counts(mixed)) == pytest.approx({"han": 6 / 9, "latin": 3 / 9})
    assert reason(mixed, scripts=("han",), min_script_frac=0.7) == "min_script_frac"
    assert reason(mixed, scripts=("han",), min_script_frac=0.66) is None
    assert reason(mixed, scripts=("han", "latin"), min_script_frac=1.0) is None


def test_unknown_script_is_a_config_error():
    with pytest.raises(ConfigError, match="data.filters.scripts.*'klingon'"):
        QualityFilter(FilterConfig(scripts=("latin", "klingon")))


def test_filters_are_off_at_defaults():
    assert QualityFilter(FilterConfig())("$$$ 123 $$$\n$$$ 123 $$$") is None
    assert QualityFilter(FilterConfig())("") == "min_chars"  # min_chars defaults to 1
