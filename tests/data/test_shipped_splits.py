"""The shipped data's held-out arithmetic is never trained on, in any shipped set.

A fact is normalised here independently of the generators (scripts/heldout.py): a sum by its
sorted operands (a + b and b + a are one fact), a difference as asked. Every held-out fact of
every set (SFT, preference, RL prompts and their SFT form) must be absent from the union of
all training sets.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[2] / "jaxllm" / "assets"
FACT = re.compile(r"^What is (\d+) ([+-]) (\d+)\?$")
SETS = {
    "sft": ("train.jsonl", "val.jsonl"),
    "preference": ("train.jsonl", "val.jsonl"),
    "rl": ("train.jsonl", "val.jsonl"),
    "rl_sft": ("sft_train.jsonl", "sft_val.jsonl"),
}


def facts(path: Path) -> set[tuple]:
    out = set()
    for line in path.read_text("utf-8").splitlines():
        m = FACT.match(json.loads(line)["prompt"])
        if m:
            a, op, b = int(m[1]), m[2], int(m[3])
            out.add((op, min(a, b), max(a, b)) if op == "+" else (op, a, b))
    return out


def split_facts(kind: str) -> tuple[set, set]:
    folder = ASSETS / ("rl" if kind.startswith("rl") else kind)
    train, val = SETS[kind]
    return facts(folder / train), facts(folder / val)


def test_no_held_out_fact_is_trained_on_in_any_shipped_set():
    train = set().union(*(split_facts(k)[0] for k in SETS))
    for kind in SETS:
        val = split_facts(kind)[1]
        assert val, f"{kind}: no arithmetic in its val split"
        leaked = sorted(val & train)
        assert not leaked, f"{kind}: {len(leaked)} held-out facts trained on, e.g. {leaked[:3]}"


def test_rl_prompts_and_their_sft_form_hold_out_the_same_facts():
    assert split_facts("rl") == split_facts("rl_sft")
