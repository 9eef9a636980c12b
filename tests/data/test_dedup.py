"""Exact and MinHash/LSH dedup, checked against Python-set Jaccard and a pure-Python MinHash."""

from __future__ import annotations

import random
import string

import numpy as np
import pytest

from jaxllm.config import DedupConfig
from jaxllm.data import dedup
from jaxllm.data.dedup import (
    _BUCKET_WINDOW,
    ExactDedup,
    NearDedup,
    band_keys,
    estimated_jaccard,
    lsh_params,
    minhash_signatures,
    shingle_hashes,
    text_hash,
)

K = 5  # shingle size
P = 128  # permutations
M64 = (1 << 64) - 1


def random_text(rng: np.random.Generator, n: int) -> str:
    """Characters from a 20k CJK alphabet, so (almost) every 5-shingle is distinct."""
    return "".join(map(chr, 0x4E00 + rng.integers(0, 20_000, n)))


def shingles(text: str) -> set[str]:
    return {text[i : i + K] for i in range(len(text) - K + 1)} or {text}


def true_jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def pair_at(rng: np.random.Generator, target: float, length: int = 400) -> tuple[str, str]:
    """(a, b): b keeps a prefix of a and replaces the rest, sized for Jaccard ~ target."""
    s = length - K + 1
    keep = round(2 * s * target / (1 + target)) + K - 1
    a = random_text(rng, length)
    return a, a[:keep] + random_text(rng, length - keep)


# ----------------------------------------------------------------------------- exact


def test_exact_dedup_keeps_first():
    ex = ExactDedup()
    hashes = [text_hash(t.encode()) for t in ["a", "b", "a", "é", "b"]]
    assert [ex.seen(h) for h in hashes] == [False, False, True, False, True]
    assert len(ex) == 3
    assert text_hash(b"x") != text_hash(b"y") and 0 <= text_hash(b"x") < 2**64


# ----------------------------------------------------------------------------- MinHash


def _py_shingle_hash(s: str) -> int:
    h = 0
    for c in s:
        h = (h * int(dedup._MULT) + ord(c)) & M64
    for mult in (int(dedup._FMIX1), int(dedup._FMIX2), None):  # MurmurHash3 fmix64
        h ^= h >> 33
        if mult:
            h = (h * mult) & M64
    return h >> 32


def test_shingle_hashes_match_a_python_reference_across_documents():
    texts = ["hello world", "abc", "", "你好世界，再见世界", "x" * 12]
    x, offsets = shingle_hashes(texts, K)
    for i, t in enumerate(texts):
        padded = t + "\0" * max(0, K - len(t))
        want = [_py_shingle_hash(padded[j : j + K]) for j in range(len(padded) - K + 1)]
        assert x[offsets[i] : offsets[i + 1]].tolist() == want


def test_signatures_match_python_minhash_and_ignore_batching():
    rng = np.random.default_rng(1)
    long = random_text(rng, 40_000)  # crosses several shingle blocks
    texts = ["short", random_text(rng, 300), long, "ab", random_text(rng, 50)]
    sigs = minhash_signatures(texts, P, K)
    assert sigs.shape == (5, P) and sigs.dtype == np.uint32
    for i, t in enumerate(texts):
        assert (minhash_signatures([t], P, K)[0] == sigs[i]).all()
    a, b = (v[:, 0].astype(np.int64).tolist() for v in dedup._perm_params(P))
    hs = [_py_shingle_hash(texts[1][j : j + K]) for j in range(len(texts[1]) - K + 1)]
    for p in (0, 17, 127):
        assert min((a[p] * h + b[p]) % 2**32 for h in hs) == sigs[1, p]


def test_minhash_estimate_is_within_standard_errors():
    rng = np.random.default_rng(2)
    zs = []
    for target in [0.2, 0.5, 0.8, 0.95] * 10:
        a, b = pair_at(rng, target)
        j = true_jaccard(a, b)
        assert abs(j - target) < 0.02  # the construction hits its target
        est = estimated_jaccard(*minhash_signatures([a, b], P, K))
        se = np.sqrt(j * (1 - j) / P)
        assert abs(est - j) <= 4 * se, (target, j, est)
        zs.append((est - j) / se)
    assert abs(np.mean(zs)) < 4 / np.sqrt(len(zs))  # no bias
    assert estimated_jaccard(*minhash_signatures(["same text", "same text"])) == 1.0


# ----------------------------------------------------------------------------- LSH


def test_lsh_params():
    assert lsh_params(0.8, 128) == (11, 11)
    for t in (0.5, 0.7, 0.8, 0.9):
        b, r = lsh_params(t, 128)
        assert b * r <= 128
        s_curve = lambda s, b=b, r=r: 1 - (1 - s**r) ** b  # noqa: E731
        assert s_curve(min(t + 0.1, 1.0)) > (0.85 if t < 0.7 else 0.9)  # recall above threshold
        assert s_curve(t - 0.3) < 0.05  # few candidates far below it


def test_near_dedup_catches_pairs_above_threshold_and_keeps_pairs_below():
    rng = np.random.default_rng(3)
    texts, expect = [], []
    for target in [0.97, 0.95, 0.93, 0.6, 0.5, 0.3, 0.1] * 4:
        a, b = pair_at(rng, target)
        texts += [a, b]
        expect += [False, true_jaccard(a, b) > 0.9]
        assert (true_jaccard(a, b) > 0.9) == (target > 0.9)
    nd = NearDedup(DedupConfig(threshold=0.8))
    nd.add(texts[:20])  # several batches, like curate
    nd.add(texts[20:])
    assert nd.duplicates().tolist() == expect
    assert nd.stats["verified_pairs"] == sum(expect)


def test_spilled_signatures_give_the_same_answer(tmp_path):
    rng = np.random.default_rng(4)
    texts = [t for _ in range(10) for t in pair_at(rng, 0.95)]
    mem, disk = NearDedup(DedupConfig()), NearDedup(DedupConfig(), tmp_path)
    for nd in (mem, disk):
        nd.add(texts)
    assert (tmp_path / "minhash.u32").stat().st_size == len(texts) * 128 * 4
    assert mem.duplicates().tolist() == disk.duplicates().tolist() == [False, True] * 10


def test_cluster_keeps_first_and_bucket_pairs_stay_linear():
    rng = np.random.default_rng(5)
    base = random_text(rng, 3000)
    variants = [base[:i] + "字" + base[i + 1 :] for i in range(0, 3000, 10)]  # J ~ 0.99
    nd = NearDedup(DedupConfig())
    nd.add([base, *variants, random_text(rng, 3000)])
    drop = nd.duplicates()
    assert drop.tolist() == [False] + [True] * len(variants) + [False]
    m = len(variants) + 1
    bound = (_BUCKET_WINDOW + 1) * nd.bands * m
    assert nd.stats["candidate_pairs"] <= bound < m * (m - 1) // 2  # O(m), not O(m^2)


def test_small_buckets_follow_the_documented_rule_exactly():
    """Clusters of 8 variants: j is dropped iff some earlier kept i shares a band key with it
    and has estimated Jaccard >= threshold (brute force over all pairs)."""
    rnd = random.Random(1)
    words = ["".join(rnd.choice(string.ascii_lowercase) for _ in range(rnd.randint(2, 8)))
             for _ in range(2000)]  # fmt: skip
    texts = []
    for _ in range(60):
        base = [rnd.choice(words) for _ in range(120)]
        for _ in range(8):
            texts.append(" ".join(w if rnd.random() > 0.06 else rnd.choice(words) for w in base))
    cfg = DedupConfig(threshold=0.8)
    nd = NearDedup(cfg)
    nd.add(texts)
    got = nd.duplicates()
    sig = minhash_signatures(texts, cfg.num_perm, cfg.shingle)
    keys = band_keys(sig, nd.bands, nd.rows)
    want = np.zeros(len(texts), bool)
    for j in range(len(texts)):
        want[j] = any(not want[i] and (keys[i] == keys[j]).any()
                      and estimated_jaccard(sig[i], sig[j]) >= cfg.threshold for i in range(j))  # fmt: skip
    assert 0 < want.sum() < len(texts) and got.tolist() == want.tolist()


def test_drop_later_is_greedy_in_document_order():
    edges = np.array([[0, 1], [1, 2]])  # 2 only resembles 1, which is dropped: 2 is kept
    assert dedup._drop_later(edges, 3).tolist() == [False, True, False]
    edges = np.array([[0, 2], [0, 1], [1, 2]])
    assert dedup._drop_later(edges, 3).tolist() == [False, True, True]


def test_empty_near_dedup():
    assert NearDedup(DedupConfig()).duplicates().shape == (0,)


@pytest.mark.parametrize("text", ["", "a", "abcd"])
def test_texts_shorter_than_a_shingle_are_one_shingle(text):
    sig = minhash_signatures([text, text + "z"])
    assert estimated_jaccard(sig[0], sig[0]) == 1.0
    assert estimated_jaccard(sig[0], sig[1]) < 0.2
