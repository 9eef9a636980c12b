"""Writes `jaxllm/assets/tool/`: three-digit sums for RL with a calculator tool (`grpo.env:
calculator`), deterministic, stdlib only.

  sft_train.jsonl  {"prompt": "What is 347 + 589?", "response": ..., "task": "math"}: most
                   responses are the bare answer "936"; a small share (TOOL_SHARE) call the
                   calculator first: "<tool>347 + 589</tool><result>936</result>936". The tiny
                   model cannot add three-digit numbers by itself, nor discover the tool by
                   chance: these demonstrations make it call the tool now and then, and RL
                   with the calculator can then teach it that calling pays
                   (tiny_sft_tool.yaml, then tiny_grpo_tool.yaml).
  sft_val.jsonl    the held-out facts with the bare answer (the SFT stage's exact match
                   compares final answers: the text after the last </result>)
  train.jsonl      RL prompts {"prompt", "answer", "task": "math"}: training facts that are
                   not in sft_train.jsonl
  val.jsonl        the held-out facts as RL prompts (greedy accuracy before/after)

The phrasing is the SFT set's math task (scripts/make_sft_data.py). A fact is held out by
scripts/heldout.py's rule (a + b and b + a are one fact), the rule of every shipped set.

    python scripts/make_tool_data.py [--out jaxllm/assets/tool]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from heldout import arith_key, in_val

ROOT = Path(__file__).resolve().parent.parent
TOOL_SHARE = 0.2  # SFT demonstrations that call the calculator
SIZES = {"sft_train": 2000, "train": 1000, "val": 64}


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def tool_answer(a: int, b: int) -> str:
    return f"<tool>{a} + {b}</tool><result>{a + b}</result>{a + b}"


def facts(rng: random.Random) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Distinct three-digit facts (a, b), as (training, held-out): enough of each for SIZES."""
    train, val, seen = [], [], set()
    need_train = SIZES["sft_train"] + SIZES["train"]
    while len(train) < need_train or len(val) < SIZES["val"]:
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        key = arith_key(a, "+", b)
        if key in seen:
            continue
        seen.add(key)
        (val if in_val(key) else train).append((a, b))
    return train[:need_train], val[: SIZES["val"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "jaxllm" / "assets" / "tool"))
    args = parser.parse_args()
    rng = random.Random(0)
    train, val = facts(rng)
    sft, rl = train[: SIZES["sft_train"]], train[SIZES["sft_train"] :]
    sets = {
        "sft_train": [
            {
                "prompt": question(a, b),
                "task": "math",
                "response": tool_answer(a, b) if rng.random() < TOOL_SHARE else str(a + b),
            }
            for a, b in sft
        ],
        "sft_val": [
            {"prompt": question(a, b), "response": str(a + b), "task": "math"} for a, b in val
        ],
        "train": [{"prompt": question(a, b), "answer": str(a + b), "task": "math"} for a, b in rl],
        "val": [{"prompt": question(a, b), "answer": str(a + b), "task": "math"} for a, b in val],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in sets.items():
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
        print(f"{path}: {len(rows)} records")
    tools = sum("<tool>" in r["response"] for r in sets["sft_train"])
    print(f"sft_train: {tools} of {len(sft)} demonstrations call the calculator")


if __name__ == "__main__":
    main()
