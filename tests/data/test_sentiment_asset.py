"""The shipped sentiment set (jaxllm/assets/sentiment): what stats.json says, two labels, no
empty text, no text in two splits, and each split where the SHA-256 rule puts it."""

import gzip
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ASSET = ROOT / "jaxllm/assets/sentiment"
sys.path.insert(0, str(ROOT / "scripts"))

from extract_sentiment import split_of  # noqa: E402


def rows(split: str) -> list[dict]:
    with gzip.open(ASSET / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_sentiment_splits_match_their_stats_and_rule():
    stats = json.loads((ASSET / "stats.json").read_text())
    seen: dict[str, str] = {}
    for split in ("train", "val", "test"):
        data = rows(split)
        counts = {lab: sum(r["label"] == lab for r in data) for lab in ("positive", "negative")}
        assert counts == stats["splits"][split]
        assert all(
            set(r) == {"text", "label"} and r["text"].strip() == r["text"] != "" for r in data
        )
        for r in data:
            assert seen.setdefault(r["text"], split) == split  # a text lives in one split
            assert split_of(r["text"]) == split
    total = sum(sum(v.values()) for v in stats["splits"].values())
    assert len(seen) == total == sum(stats["unique"].values()) - 2 * stats["dropped_in_both"]
