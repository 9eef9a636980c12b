"""Exact and near (MinHash + LSH) deduplication with small, fixed-size state per document.

Exact: a 64-bit BLAKE2b hash of the normalised text; the first occurrence is kept.

Near: a document's shingles are its character `shingle`-grams (code points from UTF-32, combined
by a polynomial hash in uint64 and mixed down to 32 bits, all in numpy). MinHash uses `num_perm`
hash functions h_i(x) = (a_i * x + b_i) mod 2^32 (a_i odd, random): 32-bit arithmetic cannot
overflow into wrong values, and it runs on 4-8 SIMD lanes. The signature is the min of each h_i
over the shingles; two signatures agree in entry i with probability ~ Jaccard(shingle sets).

LSH: the first bands*rows signature entries are cut into `bands` bands of `rows`; documents that
agree on a whole band become candidates (P = 1 - (1 - s^rows)^bands at Jaccard s). `lsh_params`
picks the (bands, rows) with bands*rows <= num_perm that minimises 0.3 * (false-positive area
below the threshold) + 0.7 * (false-negative area above it) of that S-curve. False negatives
weigh more because every candidate is verified on the full signature (estimated Jaccard >=
threshold) before it counts, so a false positive costs one comparison while a false negative
is a duplicate kept. For threshold 0.8 and 128 permutations this gives 11 bands of 11 rows.

Memory: per document only the band keys (uint64 x bands) stay in RAM; full signatures are
spilled to a file and read back only for the candidate pairs.
"""

from __future__ import annotations

import functools
import hashlib
import os
from array import array
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxllm.config import DedupConfig
from jaxllm.data.clean import code_points

_MULT = np.uint64(0x9E3779B97F4A7C15)
_FMIX1 = np.uint64(0xFF51AFD7ED558CCD)
_FMIX2 = np.uint64(0xC4CEB9FE1A85EC53)
_MAX32 = np.uint32(0xFFFFFFFF)
_BLOCK = 1 << 21  # uint32 hash values per MinHash block (measured: larger blocks amortise better)
_PERM_SEED = 0x5EED  # fixed: signatures must not depend on the run's seed
_VERIFY_CHUNK = 8192  # candidate pairs verified per step (<= 8 MiB of signatures read)
_BUCKET_WINDOW = 8  # earlier bucket members each document is compared with (and the first)


def text_hash(data: bytes) -> int:
    """64-bit hash of a document's UTF-8 bytes (exact dedup key)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class ExactDedup:
    """Remembers the hashes seen so far; `seen(h)` is True for the second and later copies.

    An open-addressing table of uint64 in an `array` (load <= 1/2): 16-32 bytes per document
    where a Python `set` of ints costs ~70, which matters at tens of millions of documents."""

    def __init__(self) -> None:
        self._table = array("Q", bytes(8 * 1024))
        self._mask = 1023
        self._count = 0

    def seen(self, h: int) -> bool:
        h = h or 1  # 0 marks an empty slot
        table, mask = self._table, self._mask
        i = h & mask
        while True:
            v = table[i]
            if v == h:
                return True
            if v == 0:
                break
            i = (i + 1) & mask
        table[i] = h
        self._count += 1
        if 2 * self._count > mask:
            self._grow()
        return False

    def _grow(self) -> None:
        old = self._table
        self._table = array("Q", bytes(16 * len(old)))
        self._mask = 2 * len(old) - 1
        table, mask = self._table, self._mask
        for h in old:
            if h:
                i = h & mask
                while table[i]:
                    i = (i + 1) & mask
                table[i] = h

    def __len__(self) -> int:
        return self._count


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser, in place on a uint64 array: every input bit affects
    every output bit, so polynomial combinations become well-spread hashes."""
    h ^= h >> np.uint64(33)
    h *= _FMIX1
    h ^= h >> np.uint64(33)
    h *= _FMIX2
    h ^= h >> np.uint64(33)
    return h


def shingle_hashes(texts: Sequence[str], shingle: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of every character `shingle`-gram of every text, concatenated, and the
    offsets [n + 1] of each text's run. A text shorter than `shingle` is one (padded) shingle."""
    k = shingle
    padded = [t if len(t) >= k else t + "\0" * (k - len(t)) for t in texts]
    lengths = np.fromiter(map(len, padded), np.int64, len(padded))
    cps = code_points("".join(padded)).astype(np.uint64)
    m = len(cps) - k + 1
    h = cps[:m].copy()
    for j in range(1, k):
        h *= _MULT
        h += cps[j : j + m]
    h32 = (fmix64(h) >> np.uint64(32)).astype(np.uint32)
    counts = lengths - k + 1  # shingles that start and end inside each text
    offsets = np.concatenate(([0], np.cumsum(counts)))
    starts = np.cumsum(lengths) - lengths
    idx = np.arange(offsets[-1]) + np.repeat(starts - offsets[:-1], counts)
    return h32[idx], offsets


@functools.cache
def _perm_params(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(_PERM_SEED)
    a = rng.integers(0, 2**32, num_perm, dtype=np.uint64).astype(np.uint32) | np.uint32(1)
    b = rng.integers(0, 2**32, num_perm, dtype=np.uint64).astype(np.uint32)
    return a[:, None], b[:, None]


def minhash_signatures(texts: Sequence[str], num_perm: int = 128, shingle: int = 5) -> np.ndarray:
    """MinHash signatures [len(texts), num_perm] (uint32) of the texts' character shingles.
    Work is done in blocks of shingles across documents, so short texts cost no extra calls."""
    x, offsets = shingle_hashes(texts, shingle)
    a, b = _perm_params(num_perm)
    sigs = np.full((len(texts), num_perm), _MAX32, np.uint32)
    chunk = max(_BLOCK // num_perm, 256)
    buf = np.empty((num_perm, chunk), np.uint32)
    for lo in range(0, len(x), chunk):
        hi = min(lo + chunk, len(x))
        h = buf[:, : hi - lo]
        np.multiply(a, x[None, lo:hi], out=h)
        np.add(h, b, out=h)
        first = int(np.searchsorted(offsets, lo, side="right")) - 1
        last = int(np.searchsorted(offsets, hi, side="left"))  # texts [first, last) overlap
        cuts = np.maximum(offsets[first:last], lo) - lo
        block = sigs[first:last]
        np.minimum(block, np.minimum.reduceat(h, cuts, axis=1).T, out=block)
    return sigs


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float | np.ndarray:
    """Share of equal signature entries: the MinHash estimate of the shingle-set Jaccard
    (standard error sqrt(J (1 - J) / num_perm)). Works row-wise on [n, num_perm] arrays."""
    eq = np.mean(np.asarray(sig_a) == np.asarray(sig_b), axis=-1)
    return float(eq) if np.ndim(eq) == 0 else eq


@functools.cache
def lsh_params(
    threshold: float, num_perm: int, fp_weight: float = 0.3, fn_weight: float = 0.7
) -> tuple[int, int]:
    """(bands, rows), bands * rows <= num_perm, minimising the weighted false-positive and
    false-negative areas of the LSH S-curve around `threshold` (see the module docstring)."""
    pairs = [(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)]
    bands, rows = (np.array(x, np.float64)[:, None] for x in zip(*pairs))
    lo, hi = np.linspace(0.0, threshold, 501), np.linspace(threshold, 1.0, 501)
    fp = np.trapezoid(1.0 - (1.0 - lo**rows) ** bands, lo, axis=1)
    fn = np.trapezoid((1.0 - hi**rows) ** bands, hi, axis=1)
    best = int(np.argmin(fp_weight * fp + fn_weight * fn))
    return pairs[best]


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """uint64 key per (document, band): a hash of the band's `rows` signature entries."""
    v = sigs[:, : bands * rows].reshape(len(sigs), bands, rows).astype(np.uint64)
    key = np.zeros((len(sigs), bands), np.uint64)
    for j in range(rows):
        key *= _MULT
        key += v[:, :, j]
    return fmix64(key)


class NearDedup:
    """Streaming near-duplicate detection. `add` batches of documents in corpus order, then
    `duplicates()` marks each document that is a verified near duplicate of an earlier kept one
    (so the first document of a cluster is kept). Signatures spill to `workdir` if given."""

    def __init__(self, cfg: DedupConfig, workdir: Path | None = None) -> None:
        self.threshold, self.num_perm, self.shingle = cfg.threshold, cfg.num_perm, cfg.shingle
        self.bands, self.rows = lsh_params(cfg.threshold, cfg.num_perm)
        self.count = 0
        self.stats = {"candidate_pairs": 0, "verified_pairs": 0}
        self._keys: list[np.ndarray] = []
        self._sigs: list[np.ndarray] = []
        self._path = Path(workdir) / "minhash.u32" if workdir is not None else None
        self._file = open(self._path, "wb") if self._path else None  # noqa: SIM115

    def add(self, texts: Sequence[str]) -> None:
        if not texts:
            return
        sigs = minhash_signatures(texts, self.num_perm, self.shingle)
        self._keys.append(band_keys(sigs, self.bands, self.rows))
        if self._file is not None:
            self._file.write(sigs.tobytes())
        else:
            self._sigs.append(sigs)
        self.count += len(texts)

    def duplicates(self) -> np.ndarray:
        """bool [count]: True for documents to drop."""
        if self._file is not None:
            self._file.close()
        if self.count == 0:
            return np.zeros(0, bool)
        pairs = self._candidate_pairs()
        ok = np.zeros(len(pairs), bool)
        for lo in range(0, len(pairs), _VERIFY_CHUNK):
            chunk = pairs[lo : lo + _VERIFY_CHUNK]
            rows, where = np.unique(chunk, return_inverse=True)
            sigs = self._rows(rows)[where.reshape(chunk.shape)]
            ok[lo : lo + len(chunk)] = estimated_jaccard(sigs[:, 0], sigs[:, 1]) >= self.threshold
        self.stats = {"candidate_pairs": len(pairs), "verified_pairs": int(ok.sum())}
        return _drop_later(pairs[ok], self.count)

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        """Signatures of the given (sorted) documents. Spilled ones are read with pread, not a
        memory map: mapped pages of a randomly read file would all count as resident memory."""
        if self._path is None:
            if len(self._sigs) > 1:
                self._sigs = [np.concatenate(self._sigs)]
            return self._sigs[0][rows]
        size = 4 * self.num_perm
        with open(self._path, "rb") as f:
            data = b"".join(os.pread(f.fileno(), size, r * size) for r in rows.tolist())
        return np.frombuffer(data, np.uint32).reshape(len(rows), self.num_perm)

    def _candidate_pairs(self) -> np.ndarray:
        """Unique (i, j), i < j, sharing a band key: each document is paired with the first and
        with the `_BUCKET_WINDOW` previous documents of its bucket, so a bucket of m costs O(m),
        not O(m^2); every pair of a bucket up to `_BUCKET_WINDOW + 1` documents is compared
        (a duplicate further back in a larger bucket can be missed)."""
        n = self.count
        found = [np.zeros(0, np.int64)]
        for band in range(self.bands):
            col = np.concatenate([k[:, band] for k in self._keys])
            order = np.argsort(col, kind="stable")  # equal keys keep ascending doc order
            s = col[order]
            head = np.concatenate(([True], s[1:] != s[:-1]))
            members = np.flatnonzero(~head)
            if not len(members):
                continue
            start = np.maximum.accumulate(np.where(head, np.arange(n), 0))[members]
            j = order[members]
            found.append(order[start] * n + j)
            for back in range(1, _BUCKET_WINDOW + 1):
                inside = members - back >= start
                found.append(order[members[inside] - back] * n + j[inside])
            found = [np.unique(np.concatenate(found))]
        codes = np.unique(np.concatenate(found))
        return np.stack([codes // n, codes % n], axis=1)


def _drop_later(edges: np.ndarray, n: int) -> np.ndarray:
    """Greedy in document order: j is dropped if it has a verified edge to an earlier kept i."""
    drop = np.zeros(n, bool)
    order = np.lexsort((edges[:, 0], edges[:, 1]))
    for i, j in edges[order].tolist():
        if not drop[i]:
            drop[j] = True
    return drop
