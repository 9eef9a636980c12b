"""How a chat model answers the service questions: polite rate and right-fact rate.

Asks every service question of the shipped SFT set (136 training, 24 held out) through the
chat template with `stage: generate`: 4 samples each at temperature 1 (no top-k/top-p) and
one greedy answer. An answer is polite by the `polite` rule (`jaxllm/trainers/rewards.py`)
and has the right fact when at least 80 % of its question's fact words (from
`make_preference_data.SERVICE`) are among its words. Prints one line per
(sampled/greedy, train/val) and writes the generations under --out.

    python scripts/service_answers.py --checkpoint runs/tiny/6-tiny_sft_service/checkpoints \
        --out runs/service_answers
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from make_preference_data import SERVICE  # noqa: E402

from jaxllm.main import main as jaxllm_main  # noqa: E402
from jaxllm.trainers.rewards import _words, polite  # noqa: E402

SAMPLES = 4


def questions(split: str) -> list[str]:
    rows = map(json.loads, (ROOT / f"jaxllm/assets/sft/{split}.jsonl").open(encoding="utf-8"))
    return sorted({r["prompt"] for r in rows if r["task"] == "service"})


def right_fact(answer: str, fact: str) -> bool:
    want, have = _words(fact), set(_words(answer))
    return sum(w in have for w in want) >= 0.8 * len(want)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    split = {"train": questions("train"), "val": questions("val")}
    every = split["train"] + split["val"]
    kinds = {
        "sampled": dict(prompts=[q for q in every for _ in range(SAMPLES)], temperature=1.0,
                        top_k=0, top_p=1.0),
        "greedy": dict(prompts=every, temperature=0.0),
    }  # fmt: skip
    fact = {q: f for qs, f in SERVICE for q in qs}
    args.out.mkdir(parents=True, exist_ok=True)
    for kind, gen in kinds.items():
        cfg = {"stage": "generate", "seed": 0, "output_dir": str(args.out / kind),
               "progress": False, "inputs": {"checkpoint": args.checkpoint},
               "generate": {"chat": True, "max_new_tokens": 48, "batch_size": 64, **gen}}  # fmt: skip
        path = args.out / f"{kind}.yaml"
        path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
        if jaxllm_main(["--config", str(path)]) != 0:
            raise SystemExit(f"{kind}: the generate stage failed")
        lines = (args.out / kind / "generations.jsonl").read_text(encoding="utf-8").splitlines()
        rows = [json.loads(x) for x in lines]
        for name, qs in split.items():
            mine = [r for r in rows if r["prompt"] in set(qs)]
            pol = sum(polite(r["completion"]) for r in mine) / len(mine)
            ok = sum(right_fact(r["completion"], fact[r["prompt"]]) for r in mine) / len(mine)
            print(f"{kind} {name}: {len(mine)} answers, polite {pol:.3f}, right fact {ok:.3f}")


if __name__ == "__main__":
    main()
