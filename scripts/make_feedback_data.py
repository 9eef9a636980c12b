"""Writes the shipped unpaired feedback set `jaxllm/assets/preference/feedback_{train,val}.jsonl`
from the preference set beside it (stdlib only), for KTO (`dpo.loss: kto`).

Each record of the preference set becomes one unpaired record, as a log of rated answers
would hold: one of its answers, drawn at random, and one bit,
`{"prompt", "completion", "label": true | false, "task"}`. A service ranking's polite and
curt answers (its two best of six) are marked good, the others (polite with another
question's fact, evasive, word salad, rude) bad; a math pair's right sum good and its wrong
one bad, drawn with even odds. So no prompt has both a good and a bad answer, and bad marks
outnumber good ones (about 2 in 6 service answers are good). Train comes from train and val
from val, so the held-out split is the preference set's.

    python scripts/make_feedback_data.py [--dir jaxllm/assets/preference]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOOD_RANKS = 2  # a ranking's best two answers are marked good


def unpaired(record: dict, rng: random.Random) -> dict:
    """One answer of a preference record with its mark."""
    if "ranking" in record:
        rank = rng.randrange(len(record["ranking"]))
        completion, label = record["responses"][record["ranking"][rank]], rank < GOOD_RANKS
    else:
        label = rng.random() < 0.5
        completion = record["chosen"] if label else record["rejected"]
    out = {"prompt": record["prompt"], "completion": completion, "label": label}
    return {**out, "task": record["task"]} if "task" in record else out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=ROOT / "jaxllm" / "assets" / "preference")
    args = ap.parse_args()
    rng = random.Random(0)
    for split in ("train", "val"):
        lines = (args.dir / f"{split}.jsonl").read_text("utf-8").splitlines()
        records = [unpaired(json.loads(line), rng) for line in lines]
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (args.dir / f"feedback_{split}.jsonl").write_text(text, "utf-8")
        good = sum(r["label"] for r in records)
        print(f"feedback_{split}.jsonl: {len(records)} records, {good} marked good")


if __name__ == "__main__":
    main()
