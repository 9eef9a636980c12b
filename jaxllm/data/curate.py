"""`stage: data`: sources → normalise → filter → exact + near dedup → split → mix → shards.

Two passes, with memory that does not grow with the text:

1. Stream every source: strip the `<s>`/`</s>` markers, normalise, filter, exact-dedup, pick the
   split (a hash of seed and normalised text, so it is decided before any upsampling and copies
   never cross splits) and the train copies (mixing weight w: floor(w) copies plus one more with
   probability frac(w), from a hash of (seed, source, record index)), and MinHash the text.
   Survivors go to a temporary JSONL file; RAM keeps ~9 bytes of numbers, the exact hash and
   the LSH band keys per document.
2. Near-dedup on the band keys, then re-read the temporary file and write each kept document
   once to val, or `copies` times to train (mixing comes after dedup, so copies are not dups).

Dedup runs across sources in config order and keeps the first copy, even when that copy's source
has weight 0 (then the document is in no training split); list preferred sources first. Val is
not reweighted: it keeps every source's natural share.

Outputs in `out_dir` (a contract other stages read): `train/shard-00000.jsonl ...`,
`val/shard-00000.jsonl ...` (`{"text": "<s>…</s>", "source": name}` per line, `shard_docs`
lines per shard, a split without documents has no shards) and `data_report.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm import tqdm

from jaxllm.config import DataConfig, SourceConfig, to_dict
from jaxllm.data.clean import BOS, EOS, QualityFilter, normalize, strip_markers
from jaxllm.data.dedup import ExactDedup, NearDedup, text_hash
from jaxllm.data.sources import ErrorLog, read_source, source_files, source_name
from jaxllm.errors import DataError

_TMP = ".curate-tmp"
_BATCH_CHARS = 1 << 18  # characters MinHashed per call
_M64 = (1 << 64) - 1
_JSON_STR = json.encoder.encode_basestring  # C-accelerated; json.dumps(...) is ~3x slower here


@dataclass
class SourceStats:
    """Per-source counts for the report."""

    name: str
    weight: float
    files: int = 0
    bytes_in: int = 0  # uncompressed bytes of the records read
    docs_in: int = 0
    chars_in: int = 0
    dropped: Counter = field(default_factory=Counter)  # per filter (its config key)
    exact_dups: int = 0
    near_dups: int = 0
    errors: Counter = field(default_factory=Counter)  # per error kind
    train_unmixed: int = 0  # train documents before mixing weights
    train_docs: int = 0
    train_chars: int = 0
    val_docs: int = 0
    val_chars: int = 0

    def to_dict(self) -> dict[str, Any]:
        eff = self.train_docs / self.train_unmixed if self.train_unmixed else None
        return {
            "files": self.files,
            "bytes_in": self.bytes_in,
            "docs_in": self.docs_in,
            "chars_in": self.chars_in,
            "dropped": dict(sorted(self.dropped.items())),
            "exact_dups": self.exact_dups,
            "near_dups": self.near_dups,
            "errors": dict(sorted(self.errors.items())),
            "weight": self.weight,
            "effective_weight": eff,
            "train": {"docs": self.train_docs, "chars": self.train_chars},
            "val": {"docs": self.val_docs, "chars": self.val_chars},
        }


def curate(cfg: DataConfig, out_dir: Path, seed: int, progress: bool = True) -> dict:
    """Curates `cfg.sources` into `out_dir` (see the module docstring); returns the report,
    also written atomically to `out_dir/data_report.json`. Raises `DataError` if no document
    survives (naming the filter that dropped most) or on bad input with on_error: fail."""
    out_dir = Path(out_dir)
    curator = _Curator(cfg, out_dir, seed)  # validates the filters before touching files
    _clear_outputs(out_dir)
    try:
        report = curator.run(progress)
    finally:
        shutil.rmtree(out_dir / _TMP, ignore_errors=True)
    _write_json_atomic(out_dir / "data_report.json", report)
    return report


class _Curator:
    def __init__(self, cfg: DataConfig, out_dir: Path, seed: int) -> None:
        self.cfg, self.out_dir, self.seed = cfg, out_dir, seed
        self.filter = QualityFilter(cfg.filters)
        self.errors = ErrorLog(cfg.on_error)
        names = _unique_names(cfg.sources)
        self.stats = [SourceStats(n, s.weight) for n, s in zip(names, cfg.sources)]
        self.exact = ExactDedup()
        self.near: NearDedup | None = None
        self.seed_key = _mix64(seed & _M64)
        # Per surviving document, in temporary-file order.
        self.src, self.val, self.copies, self.chars = array("H"), array("B"), array("H"), array("I")
        self.batch: list[str] = []
        self.batch_chars = 0
        self.timing: dict[str, float] = {"minhash": 0.0}

    def run(self, progress: bool) -> dict[str, Any]:
        t0 = time.perf_counter()
        tmp = self.out_dir / _TMP
        tmp.mkdir(parents=True)
        if self.cfg.dedup.near:
            self.near = NearDedup(self.cfg.dedup, tmp)
        total = sum(p.stat().st_size for s in self.cfg.sources for p in source_files(s))
        bar = tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc="curate",
            file=sys.stderr,
            disable=not progress,
            dynamic_ncols=True,
        )
        with bar, open(tmp / "survivors.jsonl", "wb", buffering=1 << 20) as out:
            for sid, src in enumerate(self.cfg.sources):
                self._read(sid, src, out, bar.update)
            self._flush_batch()
        t1 = time.perf_counter()
        drop = self.near.duplicates() if self.near else np.zeros(len(self.src), bool)
        t2 = time.perf_counter()
        self._check_survivors(drop)
        shards = self._write(tmp / "survivors.jsonl", drop)
        t3 = time.perf_counter()
        minhash = self.timing["minhash"]
        self.timing = {
            "read_filter_exact": t1 - t0 - minhash,
            "minhash": minhash,
            "near_dedup": t2 - t1,
            "write": t3 - t2,
        }
        return self._report(shards, t3 - t0)

    def _read(
        self, sid: int, src: SourceConfig, out: BinaryIO, update: Callable[[int], object]
    ) -> None:
        """Pass 1 over one source: the hot loop (per document: a few C-level string ops)."""
        st, name = self.stats[sid], self.stats[sid].name
        st.files = len(source_files(src))
        before = Counter(self.errors.counts)
        norm, keep, exact = self.cfg.normalize, self.filter, self.cfg.dedup.exact
        for index, rec in enumerate(read_source(src, self.errors, update)):
            st.docs_in += 1
            st.chars_in += len(rec.text)
            st.bytes_in += rec.nbytes
            text = strip_markers(rec.text)
            if norm:
                text = normalize(text)
            reason = keep(text)
            if reason:
                st.dropped[reason] += 1
                continue
            data = text.encode("utf-8")  # no lone surrogates: the readers reject them
            h = text_hash(data)
            if exact and self.exact.seen(h):
                st.exact_dups += 1
                continue
            self._keep(sid, name, index, text, h, out)
        st.errors = self.errors.counts - before

    def _keep(self, sid: int, name: str, index: int, text: str, h: int, out: BinaryIO) -> None:
        is_val = _mix64(h ^ self.seed_key) < self.cfg.val_fraction * 2.0**64
        copies = 1 if is_val else _copies(self.seed, name, index, self.stats[sid].weight)
        line = f'{{"text": {_JSON_STR(BOS + text + EOS)}, "source": {_JSON_STR(name)}}}\n'
        out.write(line.encode())
        self.src.append(sid)
        self.val.append(is_val)
        self.copies.append(copies)
        self.chars.append(len(text))
        if self.near is not None:
            self.batch.append(text)
            self.batch_chars += len(text)
            if self.batch_chars >= _BATCH_CHARS:
                self._flush_batch()

    def _flush_batch(self) -> None:
        if self.near is not None and self.batch:
            t0 = time.perf_counter()
            self.near.add(self.batch)
            self.timing["minhash"] += time.perf_counter() - t0
        self.batch, self.batch_chars = [], 0

    def _check_survivors(self, drop: np.ndarray) -> None:
        """Fail early, with the reason, when nothing (or nothing for train) would be written."""
        keep = ~drop
        val = np.frombuffer(self.val, np.uint8).astype(bool)
        if not keep.any():
            raise DataError(_nothing_survived(self.stats, self.errors, int(drop.sum())))
        copies = np.frombuffer(self.copies, np.uint16)
        if not copies[keep & ~val].any():
            weights = ", ".join(f"{s.name}={s.weight}" for s in self.stats)
            raise DataError(
                f"no training documents: {int((keep & val).sum())} kept documents all went to val "
                f"or have mixing weight 0 ({weights}); raise a weight or lower data.val_fraction"
            )

    def _write(self, survivors: Path, drop: np.ndarray) -> dict[str, int]:
        """Pass 2: copy the kept lines to the split shards (no JSON parsing needed)."""
        train = _ShardWriter(self.out_dir / "train", self.cfg.shard_docs)
        val = _ShardWriter(self.out_dir / "val", self.cfg.shard_docs)
        with train, val, open(survivors, "rb", buffering=1 << 20) as f:
            for i, line in enumerate(f):
                st = self.stats[self.src[i]]
                if drop[i]:
                    st.near_dups += 1
                elif self.val[i]:
                    val.write(line, 1)
                    st.val_docs += 1
                    st.val_chars += self.chars[i]
                else:
                    n = self.copies[i]
                    train.write(line, n)
                    st.train_unmixed += 1
                    st.train_docs += n
                    st.train_chars += n * self.chars[i]
        return {"train_shards": train.shards, "val_shards": val.shards}

    def _report(self, shards: dict[str, int], seconds: float) -> dict[str, Any]:
        totals = _totals(self.stats, self.errors)
        mb_s = float(f"{totals['bytes_in'] / 1e6 / max(seconds, 1e-9):.4g}")
        totals.update(seconds=round(seconds, 3), mb_per_s=mb_s)
        train_chars = max(totals["train_chars"], 1)
        near = self.near
        return {
            "seed": self.seed,
            "sources": {s.name: s.to_dict() for s in self.stats},
            "totals": totals,
            "errors": self.errors.to_dict(),
            "weights": {
                s.name: {
                    "weight": s.weight,
                    "effective_weight": s.to_dict()["effective_weight"],
                    "train_char_share": round(s.train_chars / train_chars, 6),
                }
                for s in self.stats
            },
            "lsh": None
            if near is None
            else {
                "bands": near.bands,
                "rows": near.rows,
                "threshold": near.threshold,
                "num_perm": near.num_perm,
                "shingle": near.shingle,
                **near.stats,
            },
            "outputs": shards,
            "seconds": round(seconds, 3),
            "mb_per_s": mb_s,
            "timing_s": {k: round(v, 3) for k, v in self.timing.items()},
            "config": to_dict(self.cfg),
        }


class _ShardWriter:
    """Writes lines to `folder/shard-00000.jsonl`, ..., `shard_docs` lines per shard."""

    def __init__(self, folder: Path, shard_docs: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.shard_docs = folder, shard_docs
        self.shards = self.in_shard = 0
        self.f: BinaryIO | None = None

    def write(self, line: bytes, copies: int) -> None:
        for _ in range(copies):
            if self.f is None or self.in_shard == self.shard_docs:
                self.close()
                path = self.folder / f"shard-{self.shards:05d}.jsonl"
                self.f = open(path, "wb", buffering=1 << 20)  # noqa: SIM115
                self.shards += 1
                self.in_shard = 0
            self.f.write(line)
            self.in_shard += 1

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _mix64(x: int) -> int:
    """SplitMix64 finaliser on a Python int: a well-spread 64-bit value from any 64-bit key."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _copies(seed: int, name: str, index: int, weight: float) -> int:
    """Train copies for mixing weight w: floor(w), plus one with probability frac(w), decided
    by a hash of (seed, source, record index) so reruns agree."""
    whole = int(weight)
    frac = weight - whole
    if frac == 0.0:
        return whole
    u = text_hash(f"{seed}\0{name}\0{index}".encode()) / 2.0**64
    return whole + (u < frac)


def _unique_names(sources: tuple[SourceConfig, ...]) -> list[str]:
    """Source names for the report; a repeated name gets a suffix (`kjv`, `kjv-2`)."""
    seen: Counter[str] = Counter()
    names = []
    for src in sources:
        name = source_name(src)
        seen[name] += 1
        names.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return names


def _totals(stats: list[SourceStats], errors: ErrorLog) -> dict[str, Any]:
    keys = (
        "bytes_in",
        "docs_in",
        "chars_in",
        "exact_dups",
        "near_dups",
        "train_docs",
        "train_chars",
        "val_docs",
        "val_chars",
    )
    totals: dict[str, Any] = {k: sum(getattr(s, k) for s in stats) for k in keys}
    totals["dropped"] = sum(sum(s.dropped.values()) for s in stats)
    totals["errors"] = sum(errors.counts.values())
    return totals


def _nothing_survived(stats: list[SourceStats], errors: ErrorLog, near: int) -> str:
    docs_in = sum(s.docs_in for s in stats)
    if docs_in == 0:
        first = errors.examples[0] if errors.examples else "no input"
        return f"no documents were read ({sum(errors.counts.values())} input errors; {first})"
    losses: Counter[str] = Counter()
    for s in stats:
        losses.update({f"filter data.filters.{k}": v for k, v in s.dropped.items()})
        losses["exact dedup"] += s.exact_dups
    losses["near dedup (data.dedup.threshold)"] += near
    what, n = losses.most_common(1)[0]
    return f"no documents survived curation: of {docs_in} read, {n} were dropped by {what} (most)"


def _clear_outputs(out_dir: Path) -> None:
    """Removes a previous run's shards and report so stale shards never mix with new ones."""
    for split in ("train", "val"):
        for shard in (out_dir / split).glob("shard-*.jsonl"):
            shard.unlink()
    (out_dir / "data_report.json").unlink(missing_ok=True)
    shutil.rmtree(out_dir / _TMP, ignore_errors=True)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
