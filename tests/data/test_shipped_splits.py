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
    "rl_think": ("think_train.jsonl", "think_val.jsonl"),
}
STEP = re.compile(r"(\d+) ([+-]) (\d+) = (-?\d+)")


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


def test_rl_prompts_and_their_sft_forms_hold_out_the_same_facts():
    assert split_facts("rl") == split_facts("rl_sft") == split_facts("rl_think")


def test_think_traces_are_right_digit_by_digit():
    """Each trace restates the question, does the units (carrying or borrowing 10), then the
    tens, and ends in the answer: checked here with Python's arithmetic on the parsed text."""
    n = 0
    for name in ("think_train.jsonl", "think_val.jsonl"):
        for line in (ASSETS / "rl" / name).read_text("utf-8").splitlines():
            rec = json.loads(line)
            a, op, b = FACT.match(rec["prompt"]).groups()
            a, b = int(a), int(b)
            want = a + b if op == "+" else a - b
            m = re.fullmatch(r"<think>(\d+) ([+-]) (\d+): (.*)</think>(\d+)", rec["response"])
            assert m, rec
            assert (int(m[1]), m[2], int(m[3])) == (a, op, b), rec
            steps = STEP.findall(m[4])
            assert len(steps) == 2, rec
            for x, o, y, z in steps:
                assert int(z) == (int(x) + int(y) if o == "+" else int(x) - int(y)), rec
            (u1, _, u2, units), (t1, _, t2, tens) = steps
            assert int(u1) % 10 == a % 10 and int(u2) == b, rec  # units column (+10 if borrowed)
            assert int(t1) == a // 10, rec  # tens column
            assert int(t2) == (int(units) >= 10 if op == "+" else int(u1) >= 10), rec  # carry
            assert int(tens) * 10 + int(units) % 10 == want == int(m[5]), rec
            n += 1
    prompts = sum(len((ASSETS / "rl" / f).read_text("utf-8").splitlines()) for f in SETS["rl"])
    assert n == prompts  # one trace per RL prompt
