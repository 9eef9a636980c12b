"""Writes the shipped reasoning set `jaxllm/assets/reasoning/{train,val}.jsonl` (stdlib only).

Short English arithmetic word problems with a worked trace before the answer:
  {"prompt": "Tom has 3 apples and buys 5 more. How many apples does he have now?",
   "response": "<think>3 + 5 = 8</think>8", "answer": "8", "task": "reasoning"}
One-step problems (+, -, *) and two-step ones ("has 12, gives away 4, then buys 3" →
"<think>12 - 4 = 8. 8 + 3 = 11</think>11"). Every number, intermediate and result is in
[0, 100). `<think>` and `</think>` are special tokens of the tokenizer, so a trace costs two
tokens of markup; `data/sft.py`'s `trace` option trains on, masks or drops it.
Held out by problem: a hash of (template, numbers) puts it in train or val, so a val problem's
numbers never appear with the same template in train (names and items are drawn per problem).

    python scripts/make_reasoning_data.py [--out jaxllm/assets/reasoning]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VAL_SHARE = 0.1
LIMITS = (3000, 200)  # (train, val) caps over all templates
NAMES = [("Tom", "he"), ("Anna", "she"), ("Sam", "he"), ("Lily", "she"), ("Ben", "he"),
         ("Mia", "she"), ("Jack", "he"), ("Emma", "she"), ("Leo", "he"), ("Zoe", "she")]  # fmt: skip
ITEMS = ["apples", "pens", "books", "coins", "cards", "eggs", "stickers", "marbles", "cookies",
         "stamps", "shells", "flowers"]  # fmt: skip
N = range(1, 50)  # operand range of sums and differences
M = range(2, 10)  # operand range of products


def _one(a: int, b: int, op: str) -> tuple[str, int]:
    c = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"{a} {op} {b} = {c}", c


# template id → (problem text, operations applied left to right, number ranges)
TEMPLATES: dict[str, tuple[str, str, tuple[range, ...]]] = {
    "buy": ("{n} has {a} {x} and buys {b} more. How many {x} does {p} have now?", "+", (N, N)),
    "get": (
        "{n} had {a} {x}. A friend gave {p2} {b} more. How many {x} does {n} have?",
        "+",
        (N, N),
    ),
    "give": ("{n} has {a} {x} and gives {b} away. How many {x} are left?", "-", (N, N)),
    "lose": ("{n} had {a} {x} but lost {b}. How many {x} does {p} have left?", "-", (N, N)),
    "bags": ("{n} buys {a} bags with {b} {x} in each. How many {x} is that?", "*", (M, M)),
    "give_buy": (
        "{n} has {a} {x}, gives away {b}, then buys {c}. How many {x} does {p} have?",
        "-+",
        (N, N, N),
    ),
    "buy_lose": (
        "{n} has {a} {x}, buys {b} more, then loses {c}. How many {x} are left?",
        "+-",
        (N, N, N),
    ),
    "bags_give": (
        "{n} has {a} boxes of {b} {x} and gives away {c}. How many {x} are left?",
        "*-",
        (M, M, N),
    ),
}


def solve(nums: tuple[int, ...], ops: str) -> tuple[str, int] | None:
    """The trace and result, or None if a step leaves [0, 100)."""
    steps, value = [], nums[0]
    for op, b in zip(ops, nums[1:]):
        step, value = _one(value, b, op)
        if not 0 <= value < 100:
            return None
        steps.append(step)
    return ". ".join(steps), value


def in_val(key: str) -> bool:
    """Deterministic held-out choice by a hash of the item's key (as in make_sft_data.py)."""
    return hashlib.sha256(key.encode()).digest()[0] < 256 * VAL_SHARE


def problems(tid: str, rng: random.Random) -> list[tuple[str, dict]]:
    text, ops, ranges = TEMPLATES[tid]
    grid: list[tuple[int, ...]] = [()]
    for r in ranges:
        grid = [g + (v,) for g in grid for v in r]
    out = []
    for nums in grid:
        solved = solve(nums, ops)
        if solved is None:
            continue
        trace, answer = solved
        name, pron = rng.choice(NAMES)
        fields = dict(zip("abc", nums), n=name, p=pron, p2="him" if pron == "he" else "her")
        prompt = text.format(x=rng.choice(ITEMS), **fields)
        rec = {"prompt": prompt, "response": f"<think>{trace}</think>{answer}"}
        rec["answer"] = str(answer)
        out.append((f"{tid}:{','.join(map(str, nums))}", rec))
    return out


def _shares(available: dict[str, int], total: int) -> dict[str, int]:
    """An even split of `total` over templates; one with fewer problems gives the rest away."""
    out, left = {}, total
    for i, (tid, n) in enumerate(sorted(available.items(), key=lambda kv: kv[1])):
        out[tid] = min(n, left // (len(available) - i))
        left -= out[tid]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "jaxllm" / "assets" / "reasoning"))
    args = parser.parse_args()
    rng = random.Random(0)
    pools = {}
    for tid in TEMPLATES:
        items = problems(tid, rng)
        t = [dict(r, task="reasoning") for k, r in items if not in_val(k)]
        v = [dict(r, task="reasoning") for k, r in items if in_val(k)]
        pools[tid] = (t, v)
    train, val = [], []
    for side, limit, rows in ((0, LIMITS[0], train), (1, LIMITS[1], val)):
        quota = _shares({tid: len(p[side]) for tid, p in pools.items()}, limit)
        for tid, n in quota.items():
            rows += rng.sample(pools[tid][side], n)
    for tid, (t, v) in pools.items():
        print(f"{tid:10s} train {sum(r in t for r in train):5d}  val {sum(r in v for r in val):4d}")
    rng.shuffle(train)
    rng.shuffle(val)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("val", val)):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
        print(f"{path}: {len(rows)} records, {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
