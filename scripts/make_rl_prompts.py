"""Writes `jaxllm/assets/rl/`: easy arithmetic prompts with verifiable answers for RL with
rule rewards (GRPO, PPO), deterministic, stdlib only.

  train.jsonl, val.jsonl          {"prompt": "What is 7 + 5?", "answer": "12", "task": "math"}
  sft_train.jsonl, sft_val.jsonl  the same facts as {"prompt", "response", "task": "arith"},
                                  for a short SFT on the training facts (tiny_sft_arith.yaml)
                                  that gives GRPO a start that is right some of the time
  think_train.jsonl, think_val.jsonl
                                  the same facts answered with a digit-by-digit trace (trace()),
                                  for tiny_sft_think.yaml
  think_sloppy_train.jsonl        the training traces of a sloppy teacher that forgets the carry
                                  (or the borrow) in about 2 of 3 facts that need one (sloppy()),
                                  so its answer is 10 off; for tiny_sft_sloppy.yaml, the start
                                  that GRPO with the exact-answer reward corrects (tiny_grpo.yaml)

The phrasing is the SFT set's math task (scripts/make_sft_data.py), with small operands:
sums a + b with a in 0..29, b in 0..9, differences a - b with b <= a. A fact is held out by
scripts/heldout.py's rule, the one the SFT and preference generators use, so no held-out
question, nor its mirror image (3 + 7 with 7 + 3), is trained on in any shipped set.

    python scripts/make_rl_prompts.py [--out jaxllm/assets/rl]
"""

from __future__ import annotations

import argparse
import hashlib
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


def sloppy(a: int, op: str, b: int) -> bool:
    """Whether the sloppy teacher forgets this fact's carry or borrow: facts that need one,
    2 of 3 of them by the SHA-256 of the fact's key (deterministic, like the held-out rule)."""
    units = a % 10
    needs = units + b >= 10 if op == "+" else units < b
    key = f"sloppy:{arith_key(a, op, b)}".encode()
    return needs and hashlib.sha256(key).digest()[0] < 256 * 2 // 3


def trace(a: int, op: str, b: int, carry: bool = True) -> str:
    """A digit-by-digit `<think>` trace and the answer: the question restated, then units
    (with the carry or the borrow), then tens. Every step is a one-digit fact that many
    training prompts share, so a held-out prompt is made of steps trained on elsewhere; the
    restated question puts the digits each step copies right before it.
    27 + 5 -> "<think>27 + 5: 7 + 5 = 12. 2 + 1 = 3</think>32"
    23 - 7 -> "<think>23 - 7: 13 - 7 = 6. 2 - 1 = 1</think>16"
    carry=False forgets the carry or borrow in the tens step, and the answer follows it:
    27 + 5 -> "<think>27 + 5: 7 + 5 = 12. 2 + 0 = 2</think>22"
    """
    tens, units = divmod(a, 10)
    if op == "+":
        s = units + b
        c = s // 10 if carry else 0
        steps = [f"{units} + {b} = {s}", f"{tens} + {c} = {tens + c}"]
        ans = 10 * (tens + c) + s % 10
    else:
        borrow = int(units < b)
        top = units + 10 * borrow
        c = borrow if carry else 0
        steps = [f"{top} - {b} = {top - b}", f"{tens} - {c} = {tens - c}"]
        ans = 10 * (tens - c) + top - b
    return f"<think>{a} {op} {b}: {'. '.join(steps)}</think>{ans}"


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    print(f"{path}: {len(rows)} records")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "jaxllm" / "assets" / "rl")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    split: dict[str, list[tuple[str, str, str, str]]] = {"train": [], "val": []}
    for a, op, b, ans in facts():
        split["val" if in_val(arith_key(a, op, b)) else "train"].append(
            (f"What is {a} {op} {b}?", str(ans), trace(a, op, b), trace(a, op, b, not sloppy(a, op, b)))
        )  # fmt: skip
    write(
        args.out / "think_sloppy_train.jsonl",
        [{"prompt": p, "response": t, "task": "arith"} for p, _, _, t in split["train"]],
    )
    for name, rows in split.items():
        write(
            args.out / f"{name}.jsonl",
            [{"prompt": p, "answer": x, "task": "math"} for p, x, _, _ in rows],
        )
        write(
            args.out / f"sft_{name}.jsonl",
            [{"prompt": p, "response": x, "task": "arith"} for p, x, _, _ in rows],
        )
        write(
            args.out / f"think_{name}.jsonl",
            [{"prompt": p, "response": t, "task": "arith"} for p, _, t, _ in rows],
        )


if __name__ == "__main__":
    main()
