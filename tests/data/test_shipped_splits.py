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
    "preference_feedback": ("feedback_train.jsonl", "feedback_val.jsonl"),
    "rl": ("train.jsonl", "val.jsonl"),
    "rl_sft": ("sft_train.jsonl", "sft_val.jsonl"),
    "rl_think": ("think_train.jsonl", "think_val.jsonl"),
    "tool": ("train.jsonl", "val.jsonl"),
    "tool_sft": ("sft_train.jsonl", "sft_val.jsonl"),
}
TRAIN_ONLY = {"rl": ("think_sloppy_train.jsonl",)}  # training sets without a val split
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
    folder = ASSETS / kind.split("_")[0]
    train, val = SETS[kind]
    return facts(folder / train), facts(folder / val)


def test_no_held_out_fact_is_trained_on_in_any_shipped_set():
    train = set().union(*(split_facts(k)[0] for k in SETS))
    train |= set().union(*(facts(ASSETS / d / f) for d, fs in TRAIN_ONLY.items() for f in fs))
    for kind in SETS:
        val = split_facts(kind)[1]
        assert val, f"{kind}: no arithmetic in its val split"
        leaked = sorted(val & train)
        assert not leaked, f"{kind}: {len(leaked)} held-out facts trained on, e.g. {leaked[:3]}"


def test_rl_prompts_and_their_sft_forms_hold_out_the_same_facts():
    assert split_facts("rl") == split_facts("rl_sft") == split_facts("rl_think")
    assert split_facts("tool")[1] == split_facts("tool_sft")[1]


def test_tool_demonstrations_are_right_and_a_small_share():
    """The calculator set: every SFT answer is the prompt's sum, bare or after a calculator
    call on the prompt's operands whose result is the sum; 10-20 % call it; the RL prompts'
    training facts are not the SFT set's."""
    calls = 0
    for line in (ASSETS / "tool" / "sft_train.jsonl").read_text("utf-8").splitlines():
        rec = json.loads(line)
        a, op, b = FACT.match(rec["prompt"]).groups()
        total = str(int(a) + int(b))
        assert op == "+" and 100 <= int(a) <= 999 and 100 <= int(b) <= 999, rec
        call = f"<tool>{a} + {b}</tool><result>{total}</result>{total}"
        assert rec["response"] in (total, call), rec
        calls += rec["response"] == call
    n = len((ASSETS / "tool" / "sft_train.jsonl").read_text("utf-8").splitlines())
    assert 0.1 <= calls / n <= 0.2, calls / n
    sft, rl = facts(ASSETS / "tool" / "sft_train.jsonl"), split_facts("tool")[0]
    assert rl and not sft & rl


def parse_trace(rec: dict) -> tuple[bool, bool]:
    """Checks one trace with Python's arithmetic on the parsed text: the question restated,
    the units column (+10 if borrowed), the tens column, the answer the steps give. Returns
    (the fact needs a carry or borrow, the trace wrote it)."""
    a, op, b = FACT.match(rec["prompt"]).groups()
    a, b = int(a), int(b)
    m = re.fullmatch(r"<think>(\d+) ([+-]) (\d+): (.*)</think>(\d+)", rec["response"])
    assert m, rec
    assert (int(m[1]), m[2], int(m[3])) == (a, op, b), rec
    steps = STEP.findall(m[4])
    assert len(steps) == 2, rec
    for x, o, y, z in steps:
        assert int(z) == (int(x) + int(y) if o == "+" else int(x) - int(y)), rec
    (u1, _, u2, units), (t1, _, t2, tens) = steps
    assert int(u1) % 10 == a % 10 and int(u2) == b, rec  # units column
    assert int(u1) == a % 10 + 10 * (op == "-" and a % 10 < b), rec  # borrow 10 when needed
    assert int(t1) == a // 10, rec  # tens column
    needs = a % 10 + b >= 10 if op == "+" else a % 10 < b
    assert int(t2) in ((0, 1) if needs else (0,)), rec  # the carry: 1 or forgotten
    assert int(m[5]) == int(tens) * 10 + int(units) % 10, rec  # the answer the steps give
    if int(t2) == int(needs):
        assert int(m[5]) == (a + b if op == "+" else a - b), rec
    return needs, int(t2) == int(needs)


def records(name: str) -> list[dict]:
    return [json.loads(x) for x in (ASSETS / "rl" / name).read_text("utf-8").splitlines()]


def test_think_traces_are_right_digit_by_digit():
    """Every shipped clean trace carries and borrows where it must, so every answer is right."""
    n = 0
    for name in ("think_train.jsonl", "think_val.jsonl"):
        for rec in records(name):
            assert parse_trace(rec)[1], rec
            n += 1
    prompts = sum(len(records(f)) for f in SETS["rl"])
    assert n == prompts  # one trace per RL prompt


def test_sloppy_traces_forget_two_carries_in_three_and_nothing_else():
    """The sloppy teacher's traces are the clean ones except that about 2 of 3 facts needing a
    carry or borrow forget it (and answer 10 off); the facts are the RL training facts."""
    recs = records("think_sloppy_train.jsonl")
    assert [r["prompt"] for r in recs] == [r["prompt"] for r in records("train.jsonl")]
    needs = [parse_trace(r) for r in recs]
    carries = [ok for need, ok in needs if need]
    forgot = 1 - sum(carries) / len(carries)
    assert len(carries) > 150 and 0.6 < forgot < 0.73, (len(carries), forgot)
