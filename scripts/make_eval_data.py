"""Writes the data of the shipped evaluation tasks `jaxllm/assets/eval/*.jsonl` (deterministic,
stdlib only) from the shipped SFT, RL and reasoning sets and the corpus.

Evaluated examples come from the held-out (val) splits only; demonstrations from the train
splits (the `heldout.py` rule), so no evaluated fact is a demonstration or an SFT example.

  arith.jsonl / arith_fewshot.jsonl   "What is 18 + 14?" → "32", with 3 wrong choices (±1, ±10)
  verse.jsonl / verse_fewshot.jsonl   "Continue this verse: …": the next KJV verse vs 3 others
  poem.jsonl                          "下一句是什么？…": the next line vs 3 lines of other poems
  sums.jsonl / sums_fewshot.jsonl     the RL sums (`answer`) with digit-by-digit traces
                                      (`trace`) for the chain-of-thought variant
  symbols.jsonl                       symbol mapping: words of two kinds get made-up labels,
                                      drawn afresh per example, so only the demonstrations
                                      (8 per example, `demos`) tell which is which
  text.jsonl                          held-out verses and poem lines, for perplexity
  rag_*.jsonl, rag_passages.jsonl     see make_rag_data.py

    python scripts/make_eval_data.py [--out jaxllm/assets/eval]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "jaxllm" / "assets"

# Symbol mapping: two kinds of words the corpus knows, and nonce labels.
ANIMALS = ["dog", "cat", "horse", "sheep", "lion", "ox", "goat", "camel", "bear", "wolf",
           "eagle", "dove", "fox", "ass", "lamb", "swine"]  # fmt: skip
PLANTS = ["tree", "grass", "vine", "wheat", "barley", "fig", "olive", "cedar", "lily", "rose",
          "oak", "palm", "reed", "thorn", "willow", "corn"]  # fmt: skip
NONCE = ["dax", "wug", "blick", "fep", "toma", "zup", "kiki", "bouba"]


def read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    print(f"{path.relative_to(ROOT)}: {len(rows)}")


def arith_choices(q: str, answer: str, rng: random.Random) -> dict:
    a = int(answer)
    wrong = [w for w in dict.fromkeys([a + 1, a - 1, a + 10, a - 10]) if w >= 0 and w != a]
    choices = [str(x) for x in [a, *rng.sample(wrong, 3)]]
    rng.shuffle(choices)
    return {"question": q, "answer": answer, "choices": choices, "gold": choices.index(answer)}


def continuation_mc(rows: list[dict], rng: random.Random) -> list[dict]:
    """Each prompt's response is gold; three other responses of the same set are distractors."""
    out = []
    answers = [r["response"] for r in rows]
    for r in rows:
        others = rng.sample([a for a in answers if a != r["response"]], 3)
        choices = [r["response"], *others]
        rng.shuffle(choices)
        out.append({"question": r["prompt"], "choices": choices,
                    "gold": choices.index(r["response"])})  # fmt: skip
    return out


def symbols(n: int, rng: random.Random) -> list[dict]:
    out = []
    for _ in range(n):
        la, lb = rng.sample(NONCE, 2)
        words = [(w, la) for w in rng.sample(ANIMALS, 5)] + [(w, lb) for w in rng.sample(PLANTS, 5)]
        rng.shuffle(words)
        query, demos = words[0], words[1:9]
        choices = sorted([la, lb])

        def rec(w: str, label: str, choices: list[str] = choices) -> dict:
            return {"question": w, "answer": label, "choices": choices,
                    "gold": choices.index(label)}  # fmt: skip

        out.append({**rec(*query), "demos": [rec(*d) for d in demos]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ASSETS / "eval")
    out = ap.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(23)
    sft_val, sft_train = read(ASSETS / "sft/val.jsonl"), read(ASSETS / "sft/train.jsonl")

    def task(rows: list[dict], name: str) -> list[dict]:
        return [r for r in rows if r["task"] == name]

    write(
        out / "arith.jsonl",
        [arith_choices(r["prompt"], r["response"], rng) for r in task(sft_val, "math")],
    )
    write(out / "arith_fewshot.jsonl",
          [arith_choices(r["prompt"], r["response"], rng) for r in task(sft_train, "math")[:200]])  # fmt: skip
    write(out / "verse.jsonl", continuation_mc(task(sft_val, "bible"), rng))
    write(out / "verse_fewshot.jsonl", continuation_mc(task(sft_train, "bible")[:200], rng))
    write(out / "poem.jsonl", continuation_mc(task(sft_val, "poem"), rng))
    think = {r["prompt"]: r["response"] for r in read(ASSETS / "rl/think_train.jsonl")}
    think |= {r["prompt"]: r["response"] for r in read(ASSETS / "rl/think_val.jsonl")}

    def sums(rows: list[dict]) -> list[dict]:
        trace = re.compile(r"<think>(.*)</think>")
        return [{"question": r["prompt"], "answer": r["answer"],
                 "trace": trace.match(think[r["prompt"]]).group(1)} for r in rows]  # fmt: skip

    write(out / "sums.jsonl", sums(read(ASSETS / "rl/val.jsonl")))
    write(out / "sums_fewshot.jsonl", sums(read(ASSETS / "rl/train.jsonl")[:200]))
    write(out / "symbols.jsonl", symbols(200, rng))
    texts = [r["response"] for r in sft_val if r["task"] in ("bible", "poem")]
    write(out / "text.jsonl", [{"text": t} for t in texts])


if __name__ == "__main__":
    main()
