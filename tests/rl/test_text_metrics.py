"""Degeneration measures and the politeness rule: hand-computed cases and numpy references."""

import sys
from pathlib import Path

import numpy as np
import pytest

from jaxllm.trainers.rewards import (
    IMPOLITE_PHRASES,
    POLITE_PHRASES,
    REWARDS,
    polite,
    template_phrases,
)
from jaxllm.trainers.text_metrics import (
    answer_quality,
    corpus_distinct_n,
    distinct_n,
    ngrams,
    repeated_ngram_share,
    well_formed,
)

ROOT = Path(__file__).resolve().parents[2]


def np_repeated_share(ids: np.ndarray, n: int) -> float:
    """Share of n-gram windows equal to an earlier window, by a numpy pairwise comparison."""
    if len(ids) < n:
        return 0.0
    win = np.lib.stride_tricks.sliding_window_view(ids, n)  # [W, n]
    same = (win[:, None, :] == win[None, :, :]).all(-1)  # [W, W]
    earlier = np.tril(same, k=-1).any(axis=1)
    return float(earlier.mean())


def np_distinct(ids: np.ndarray, n: int) -> float:
    if len(ids) < n:
        return 1.0
    win = np.lib.stride_tricks.sliding_window_view(ids, n)
    return len(np.unique(win, axis=0)) / len(win)


def test_hand_computed_cases():
    loop = ["not", "not", "not", "not", "not"]  # 3-grams: 3 of (not not not), 2 repeat
    assert ngrams(loop, 3) == [("not",) * 3] * 3
    assert repeated_ngram_share(loop, 3) == pytest.approx(2 / 3)
    assert distinct_n(loop, 2) == pytest.approx(1 / 4)
    fine = ["Happy", "to", "help!", "Open", "My", "Orders", "and", "press", "Cancel."]
    assert repeated_ngram_share(fine, 3) == 0.0 and distinct_n(fine, 2) == 1.0
    # "a b a b a": 3-grams aba, bab, aba → 1 of 3 repeats; bigrams ab ba ab ba → 2 of 4
    abab = ["a", "b", "a", "b", "a"]
    assert repeated_ngram_share(abab, 3) == pytest.approx(1 / 3)
    assert distinct_n(abab, 2) == pytest.approx(2 / 4)
    assert repeated_ngram_share(["a", "b"], 3) == 0.0 and distinct_n(["a"], 2) == 1.0
    with pytest.raises(ValueError, match="n must be"):
        ngrams(loop, 0)


@pytest.mark.parametrize("n", [2, 3])
def test_against_numpy_on_random_sequences(n):
    rng = np.random.default_rng(n)
    for length in (0, 1, 2, 5, 17, 40):
        ids = rng.integers(0, 4, size=length)  # a small alphabet: many repeats
        words = [str(i) for i in ids]
        assert repeated_ngram_share(words, n) == pytest.approx(np_repeated_share(ids, n))
        assert distinct_n(words, n) == pytest.approx(np_distinct(ids, n))


def test_corpus_distinct_sees_one_answer_for_every_prompt():
    same = [["Good", "question.", "Open", "My", "Orders."]] * 4  # 4 bigrams each, all alike
    assert [distinct_n(w, 2) for w in same] == [1.0] * 4
    assert corpus_distinct_n(same, 2) == pytest.approx(4 / 16)
    assert corpus_distinct_n([["a", "b"], ["b", "a"]], 2) == 1.0
    assert corpus_distinct_n([], 2) == 1.0 and corpus_distinct_n([["a"]], 2) == 1.0
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 3, size=k) for k in (0, 1, 4, 9)]
    flat = np.concatenate(
        [np.lib.stride_tricks.sliding_window_view(x, 2) for x in seqs if len(x) > 1]
    )
    want = len(np.unique(flat, axis=0)) / len(flat)
    assert corpus_distinct_n([[str(i) for i in x] for x in seqs], 2) == pytest.approx(want)


def test_well_formed_and_quality_means():
    assert well_formed("I'm not sure, maybe check later.")
    assert well_formed("下一句。")
    assert not well_formed("")  # empty
    assert not well_formed("Happy to help! Open the order in My")  # cut off mid-sentence
    assert not well_formed("And the be not not not not not.")  # loops
    q = answer_quality(["Sure, here is how.", "not not not not not", ""])
    assert q["repeat_3gram"] == pytest.approx(round((0 + 2 / 3 + 0) / 3, 4))
    assert q["distinct_2"] == pytest.approx(round((3 + 1) / (3 + 4), 4))  # over all answers
    assert q["well_formed"] == pytest.approx(round(1 / 3, 4))
    assert q["distinct_answers"] == 1.0
    same = answer_quality(["Buy  Again.", "Buy Again.", "Cancel it.", "Buy Again."])
    assert same["distinct_answers"] == 0.5  # two different answers (spacing ignored) of four
    assert answer_quality([]) == {}


def test_polite_rule_on_hand_examples():
    assert polite("Happy to help! Open My Orders and press Cancel.") == 1.0
    assert polite("Press Cancel in My Orders. Hope that helps!") == 1.0
    assert polite("Of course! I can't say for certain right now.") == 0.0  # evasive inside
    assert polite("I'm not sure, maybe check later.") == 0.0
    assert polite("Figure it out yourself.") == 0.0
    assert polite("And the be not not not not") == 0.0
    assert polite("happy to help!") == 1.0  # case-insensitive
    assert REWARDS["polite"] is polite


def test_phrases_are_the_preference_generators_templates():
    """The rule's phrases come from scripts/make_preference_data.py's answer templates."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import make_preference_data as gen
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert template_phrases(gen.POLITE) == POLITE_PHRASES
    assert template_phrases(gen.EVASIVE + gen.RUDE) == IMPOLITE_PHRASES
    assert template_phrases(["Of course! {fact} Anything else I can do?"]) == (
        "of course",
        "anything else i can do",
    )
    fact = "Open My Orders and press Cancel."
    ranked = [t.format(fact=fact) for t in gen.POLITE]
    assert [polite(a) for a in ranked] == [1.0] * len(ranked)
    assert [polite(a) for a in gen.EVASIVE + gen.RUDE] == [0.0] * len(gen.EVASIVE + gen.RUDE)
