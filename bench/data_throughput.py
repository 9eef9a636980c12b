"""Throughput and peak memory of `stage: data` curation on synthetic English + Chinese JSONL.

Generates a deterministic corpus of `--mb` MB (half English-like, half Chinese-like, with ~5%
exact duplicates, ~5% near duplicates and ~3% junk documents) as 8 part files per language,
then curates the first 2, 4 and 8 parts (1/4, 1/2 and all of it) twice each:

  (a) read + normalise + filters + exact dedup (`dedup.near: false`) — target >= 20 MB/s/core;
  (b) the full curation, with MinHash + LSH near dedup.

Each run is a fresh subprocess, so its peak RSS (`getrusage` high-water mark) is its own; equal
peaks across sizes show that memory stays flat. Curation is single-threaded, so MB/s (MB = 10^6
bytes of uncompressed input) is MB/s per core.

    python bench/data_throughput.py              # 200 MB, a few minutes on one core
    python bench/data_throughput.py --mb 1100    # > 1 GB: the flat-memory run (tens of minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PARTS = 8
TARGET_MB_S = 20.0
_ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- synthetic data


def _vocab(rng: np.random.Generator, n: int) -> list[str]:
    """Pseudo-English words from syllables; Zipf frequencies come from the draw order."""
    syl = [c + v for c in "bcdfghjklmnprstvwyz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    lens = rng.integers(1, 4, n)
    return ["".join(rng.choice(syl, k)) for k in lens]


def _zipf_p(n: int) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1)
    return p / p.sum()


def _cuts(rng: np.random.Generator, n: int, lo: int, hi: int) -> np.ndarray:
    """0 = c_0 < c_1 < ... < c_k = n with gaps drawn from [lo, hi): sentence/paragraph cuts."""
    c = np.cumsum(rng.integers(lo, hi, n // lo + 1))
    return np.concatenate(([0], c[c < n], [n]))


class _Generator:
    """Documents of ~0.5-4 KB; a ring of recent documents feeds exact and near duplicates."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.words = np.array(_vocab(self.rng, 20_000), dtype=object)
        self.wp = _zipf_p(len(self.words))
        self.hanzi = np.array([chr(0x4E00 + i) for i in self.rng.permutation(6000)], dtype=object)
        self.hp = _zipf_p(len(self.hanzi))
        self.recent: dict[str, list[str]] = {"en": [], "zh": []}

    def english(self) -> str:
        rng = self.rng
        words = self.words[rng.choice(len(self.words), int(rng.integers(80, 600)), p=self.wp)]
        cuts = _cuts(rng, len(words), 6, 22)
        sents = [" ".join(words[a:b]).capitalize() + "." for a, b in zip(cuts[:-1], cuts[1:])]
        paras = _cuts(rng, len(sents), 2, 6)
        return "\n\n".join(" ".join(sents[a:b]) for a, b in zip(paras[:-1], paras[1:]))

    def chinese(self) -> str:
        rng = self.rng
        chars = self.hanzi[rng.choice(len(self.hanzi), int(rng.integers(150, 1200)), p=self.hp)]
        cuts = _cuts(rng, len(chars), 5, 14)
        parts = [
            "".join(chars[a:b]) + ("，" if i % 3 else "。")
            for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))
        ]
        return "\n".join("".join(parts[i : i + 6]) for i in range(0, len(parts), 6))

    def junk(self) -> str:
        if self.rng.random() < 0.5:
            return "\n".join(["click here to subscribe"] * int(self.rng.integers(5, 30)))
        return " ".join(str(x) for x in self.rng.integers(0, 10**6, 200)) + " $$$ ### %%%"

    def doc(self, lang: str) -> str:
        r, recent = self.rng.random(), self.recent[lang]
        if r < 0.05 and recent:
            return recent[int(self.rng.integers(len(recent)))]  # exact duplicate
        if r < 0.10 and recent:
            return self._near(recent[int(self.rng.integers(len(recent)))], lang)
        text = self.junk() if r < 0.13 else self.english() if lang == "en" else self.chinese()
        recent.append(text)
        if len(recent) > 1000:
            recent.pop(int(self.rng.integers(1000)))
        return text

    def _near(self, text: str, lang: str) -> str:
        """Replaces ~1% of the words (English) or ~0.5% of the characters (Chinese)."""
        if lang == "en":
            words = text.split(" ")
            for i in self.rng.integers(0, len(words), max(1, len(words) // 100)):
                words[i] = str(self.words[self.rng.integers(len(self.words))])
            return " ".join(words)
        chars = list(text)
        for i in self.rng.integers(0, len(chars), max(1, len(chars) // 200)):
            chars[i] = str(self.hanzi[self.rng.integers(len(self.hanzi))])
        return "".join(chars)


def generate(data_dir: Path, mb: float, seed: int = 0) -> None:
    """Writes en-00k.jsonl and zh-00k.jsonl (k < PARTS), ~mb/(2*PARTS) MB each. Cached."""
    stamp = data_dir / f".done-{float(mb)}-{seed}"
    if stamp.exists():
        return
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    gen, part_bytes, t0 = _Generator(seed), mb * 1e6 / (2 * PARTS), time.perf_counter()
    for k in range(PARTS):
        for lang in ("en", "zh"):
            with open(data_dir / f"{lang}-{k:03d}.jsonl", "wb") as f:
                size = 0
                while size < part_bytes:
                    rec = {"text": f"<s>{gen.doc(lang)}</s>", "source": lang}
                    line = json.dumps(rec, ensure_ascii=False).encode() + b"\n"
                    f.write(line)
                    size += len(line)
        print(f"  generated part {k + 1}/{PARTS} ({time.perf_counter() - t0:.0f} s)", flush=True)
    stamp.touch()


# ----------------------------------------------------------------------------- one measured run


def bench_config(data_dir: Path, parts: int, near: bool):  # -> DataConfig
    """Two sources (en, zh) over the first `parts` part files, with every filter switched on."""
    from jaxllm.config import DataConfig, DedupConfig, FilterConfig, SourceConfig

    glob = f"[0-{parts - 1}]" if parts <= 10 else "*"
    return DataConfig(
        sources=tuple(
            SourceConfig(path=str(data_dir / f"{lang}-00{glob}.jsonl"), name=lang)
            for lang in ("en", "zh")
        ),
        filters=FilterConfig(
            min_chars=50,
            max_non_letter_frac=0.4,
            max_repeated_line_frac=0.3,
            max_top_ngram_frac=0.2,
            scripts=("latin", "han"),
            min_script_frac=0.8,
        ),
        dedup=DedupConfig(near=near),
        val_fraction=0.01,
    )


def run_once(data_dir: Path, parts: int, near: bool, out_dir: Path) -> dict:
    """Curates the first `parts` part files of each language; returns figures for the table.
    MB/s is given per wall second and per CPU second of this process (the machine may be
    shared; CPU time is the per-core figure that other processes cannot slow down)."""
    from jaxllm.data.clean import char_classes
    from jaxllm.data.curate import curate

    char_classes("warm up")  # builds the code-point table once (~0.3 s), outside the timing
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0, c0 = time.perf_counter(), time.process_time()
    report = curate(bench_config(data_dir, parts, near), out_dir, seed=0, progress=False)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    shutil.rmtree(out_dir, ignore_errors=True)
    tot = report["totals"]
    return {
        "mb": tot["bytes_in"] / 1e6,
        "docs": tot["docs_in"],
        "seconds": secs,
        "mb_s": tot["bytes_in"] / 1e6 / secs,
        "mb_s_cpu": tot["bytes_in"] / 1e6 / cpu,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "base_rss_mb": base_rss,
        "exact_dups": tot["exact_dups"],
        "near_dups": tot["near_dups"],
        "timing_s": report["timing_s"],
        "lsh": report["lsh"] and f"{report['lsh']['bands']}x{report['lsh']['rows']}",
    }


def _subprocess(data_dir: Path, parts: int, near: bool, work: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        str(data_dir),
        str(parts),
        str(int(near)),
        str(work / f"out-{parts}-{int(near)}"),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=200.0, help="corpus size in MB (1100: >1 GB run)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/jaxllm-bench-data"))
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        d, parts, near, out = args.worker
        sys.path.insert(0, str(_ROOT))
        print(json.dumps(run_once(Path(d), int(parts), bool(int(near)), Path(out))))
        return
    data_dir = args.work / f"{args.mb:g}MB"
    print(f"synthetic corpus: {args.mb:g} MB in {data_dir}", flush=True)
    generate(data_dir, args.mb)
    print(
        f"cores used: 1 of {os.cpu_count()} (curation is single-threaded, so MB/s is per core; "
        f"MB = 10^6 input bytes); target {TARGET_MB_S:g} MB/s per core for "
        "read + normalise + filters + exact dedup; x target uses CPU seconds",
        flush=True,
    )
    print(
        f"{'mode':<20}{'size':>5}{'MB in':>8}{'docs':>8}{'wall s':>8}{'MB/s':>7}"
        f"{'MB/cpu-s':>9}{'x target':>9}{'peak RSS MB':>12}{'base':>6}{'exact':>7}{'near':>6}"
        "  lsh  phases (s)"
    )
    for near in (False, True):
        for parts in (PARTS // 4, PARTS // 2, PARTS):
            r = _subprocess(data_dir, parts, near, args.work)
            mode = "full (MinHash+LSH)" if near else "filters + exact"
            phases = " ".join(f"{k}={v:.1f}" for k, v in r["timing_s"].items())
            print(
                f"{mode:<20}{parts / PARTS:>5.2f}{r['mb']:>8.0f}{r['docs']:>8}"
                f"{r['seconds']:>8.1f}{r['mb_s']:>7.1f}{r['mb_s_cpu']:>9.1f}"
                f"{r['mb_s_cpu'] / TARGET_MB_S:>9.2f}{r['peak_rss_mb']:>12.1f}"
                f"{r['base_rss_mb']:>6.0f}{r['exact_dups']:>7}{r['near_dups']:>6}"
                f"  {r['lsh'] or '-'}  {phases}",
                flush=True,
            )


if __name__ == "__main__":
    main()
