"""The fastest combination of a `bench/gpu_suite.sh` run's single-change ablations.

The suite times a base step (label BASE) and steps that each change one thing from it
(labels `BASE-<name>`: one `--set` more, or one XLA flag more). This picks every change that
made the step at least `--gain` faster than the base (for two values of one key, the faster),
so the suite's next jobs can run the combination in the same call: one GPU call measures,
decides and confirms.

    python bench/suite_best.py results.jsonl gpt2_124m-b16 --exclude train.z_loss --sets
    python bench/suite_best.py results.jsonl gpt2_124m-b16 --xla

`--sets` prints the chosen `--set KEY=VALUE` arguments (one line), `--xla` the chosen XLA
flags; the reasons go to stderr. `--exclude KEY` keeps a diagnostic change (one that alters
what is trained, e.g. no z-loss) out of the combination.
"""

from __future__ import annotations

import argparse
import json
import sys


def choose(rows: list[dict], base_label: str, gain: float = 1.02,
           exclude: tuple[str, ...] = ()) -> tuple[list[str], list[str], list[str]]:  # fmt: skip
    """(sets, xla flags, reasons): the changes of `BASE-*` rows at least `gain` times the
    base row's tokens/s, same docs and batch shape; one value per key, the fastest."""
    mfu = [r for r in rows if r.get("bench") == "mfu"]
    base = next((r for r in mfu if r.get("label") == base_label), None)
    if base is None:
        return [], [], [f"no row labelled {base_label}: nothing chosen"]
    base_sets, base_flags = set(base.get("sets", [])), set(base.get("xla_flags", "").split())
    best: dict[str, tuple[float, str, str]] = {}  # key -> (tokens/s, kind, value)
    reasons = []
    for r in mfu:
        if not r.get("label", "").startswith(base_label + "-"):
            continue
        if (r.get("docs"), r["batch"], r["seq_len"]) != (
            base.get("docs"),
            base["batch"],
            base["seq_len"],
        ):
            continue
        sets = [s for s in r.get("sets", []) if s not in base_sets]
        flags = [f for f in r.get("xla_flags", "").split() if f not in base_flags]
        ratio = r["tokens_per_s"] / base["tokens_per_s"]
        changes = [("set", s) for s in sets] + [("xla", f) for f in flags]
        if len(changes) != 1:
            reasons.append(f"{r['label']}: {len(changes)} changes from the base, not an ablation")
            continue
        kind, value = changes[0]
        key = value.split("=", 1)[0]
        if kind == "set" and key in exclude:
            reasons.append(f"{r['label']}: {ratio:.3f}x, diagnostic ({key} excluded)")
            continue
        won = ratio >= gain and r["tokens_per_s"] > best.get(key, (0.0,))[0]
        reasons.append(f"{r['label']}: {ratio:.3f}x the base -> {'taken' if won else 'not taken'}")
        if won:
            best[key] = (r["tokens_per_s"], kind, value)
    sets = [v for _, k, v in best.values() if k == "set"]
    flags = [v for _, k, v in best.values() if k == "xla"]
    return sets, flags, reasons


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results")
    ap.add_argument("base")
    ap.add_argument("--gain", type=float, default=1.02)
    ap.add_argument("--exclude", action="append", default=[])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--sets", action="store_true")
    what.add_argument("--xla", action="store_true")
    args = ap.parse_args()
    with open(args.results) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    sets, flags, reasons = choose(rows, args.base, args.gain, tuple(args.exclude))
    print("\n".join(f"suite_best: {r}" for r in reasons), file=sys.stderr)
    print(" ".join(f"--set {s}" for s in sets) if args.sets else " ".join(flags))


if __name__ == "__main__":
    main()
