"""Writes `jaxllm/assets/rl/{train,val}.jsonl`: easy arithmetic prompts with verifiable answers
for RL with rule rewards (GRPO, PPO), deterministic, stdlib only.

Each record is `{"prompt": "What is 7 + 5?", "answer": "12", "task": "math"}` — the phrasing of
the SFT set's math task (scripts/make_sft_data.py), with small operands: a in 0..19, b in 0..9
for sums, a in 0..19, b <= a for differences, so a tiny SFT model answers some of them right
and a group of samples carries a learning signal. A pair of operands is held out by a hash
of its key (a sum's in either order: 3 + 7 and 7 + 3 are one fact), so no held-out question,
nor its mirror image, is ever trained on.

    python scripts/make_rl_prompts.py [--out jaxllm/assets/rl]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VAL_SHARE = 0.15


def in_val(key: str) -> bool:
    return hashlib.sha256(key.encode()).digest()[0] < 256 * VAL_SHARE


def key(prompt: str) -> str:
    """The held-out key: the prompt, with a sum's operands in order, so that a + b and b + a
    (one fact) are both in train or both in val."""
    a, op, b = prompt.removeprefix("What is ").removesuffix("?").split()
    return f"{min(int(a), int(b))}+{max(int(a), int(b))}" if op == "+" else prompt


def records() -> list[dict]:
    out = []
    for a in range(20):
        for b in range(10):
            out.append({"prompt": f"What is {a} + {b}?", "answer": str(a + b), "task": "math"})
            if b <= a:
                out.append({"prompt": f"What is {a} - {b}?", "answer": str(a - b), "task": "math"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "jaxllm" / "assets" / "rl")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    split: dict[str, list[dict]] = {"train": [], "val": []}
    for r in records():
        split["val" if in_val(key(r["prompt"])) else "train"].append(r)
    for name, rows in split.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (args.out / f"{name}.jsonl").write_text(text, encoding="utf-8")
        print(f"{name}: {len(rows)} records")


if __name__ == "__main__":
    main()
