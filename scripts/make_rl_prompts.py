"""Writes `jaxllm/assets/rl/`: easy arithmetic prompts with verifiable answers for RL with
rule rewards (GRPO, PPO), deterministic, stdlib only.

  train.jsonl, val.jsonl          {"prompt": "What is 7 + 5?", "answer": "12", "task": "math"}
  sft_train.jsonl, sft_val.jsonl  the same facts as {"prompt", "response", "task": "arith"},
                                  for a short SFT on the training facts (tiny_sft_arith.yaml)
                                  that gives GRPO a start that is right some of the time

The phrasing is the SFT set's math task (scripts/make_sft_data.py), with small operands:
sums a + b with a in 0..29, b in 0..9, differences a - b with b <= a. A fact is held out by
scripts/heldout.py's rule, the one the SFT and preference generators use, so no held-out
question, nor its mirror image (3 + 7 with 7 + 3), is trained on in any shipped set.

    python scripts/make_rl_prompts.py [--out jaxllm/assets/rl]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from heldout import arith_key, in_val

ROOT = Path(__file__).resolve().parent.parent


def facts() -> list[tuple[int, str, int, int]]:
    """(a, op, b, answer): sums a + b with a < 30, b < 10; differences a - b with b <= a."""
    out = []
    for a in range(30):
        for b in range(10):
            out.append((a, "+", b, a + b))
            if b <= a:
                out.append((a, "-", b, a - b))
    return out


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    print(f"{path}: {len(rows)} records")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "jaxllm" / "assets" / "rl")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    split: dict[str, list[tuple[str, str]]] = {"train": [], "val": []}
    for a, op, b, ans in facts():
        split["val" if in_val(arith_key(a, op, b)) else "train"].append(
            (f"What is {a} {op} {b}?", str(ans))
        )
    for name, rows in split.items():
        write(
            args.out / f"{name}.jsonl",
            [{"prompt": p, "answer": x, "task": "math"} for p, x in rows],
        )
        write(
            args.out / f"sft_{name}.jsonl",
            [{"prompt": p, "response": x, "task": "arith"} for p, x in rows],
        )


if __name__ == "__main__":
    main()
