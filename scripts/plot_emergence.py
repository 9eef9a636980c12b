"""Emergence, a small look (issue 25): a `stage: eval` run over the checkpoints of a
`stage: scaling` sweep, plotted against each run's compute beside its validation loss.

    python scripts/plot_emergence.py runs/tiny_scaling runs/tiny_emergence \
        [--out docs/emergence_tiny.png]

The eval run's `eval.models` are the sweep's runs by name (`runs/<sweep>/runs/<name>/
checkpoints`); each task's accuracy (`acc`, at its largest number of demonstrations) and its
Brier score (continuous: where an accuracy near chance cannot move, it can) are drawn against
the run's FLOPs (the scaling stage's own count), each with its chance level, and the
validation loss on the same axis of compute.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CHANCE = {"verse_mc": 0.25, "poem_mc": 0.25, "arith_mc": 0.25, "symbol_map": 0.5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", help="the scaling stage's run directory")
    parser.add_argument("evals", help="the eval stage's run directory")
    parser.add_argument("--out", default="docs/emergence_tiny.png")
    args = parser.parse_args()
    sweep = json.loads((Path(args.sweep) / "summary.json").read_text())
    runs = {r["name"]: r for r in sweep["runs"]}
    held = sweep.get("prediction") or {}
    if held.get("row"):  # the held-out model the fit predicted
        runs.setdefault(held["name"], held["row"])
    tasks = json.loads((Path(args.evals) / "summary.json").read_text())["tasks"]
    fig, (ax_loss, ax_acc, ax_brier) = plt.subplots(1, 3, figsize=(15, 4.2))
    names = sorted(runs, key=lambda n: runs[n]["flops"])
    ax_loss.plot([runs[n]["flops"] for n in names], [runs[n]["val_loss"] for n in names], "o")
    ax_loss.set(xscale="log", xlabel="training FLOPs", ylabel="validation loss (nats/token)",
                title="loss falls smoothly with compute")  # fmt: skip
    for task, table in tasks.items():
        for ax, metric in ((ax_acc, "acc"), (ax_brier, "brier_score")):
            _panel(ax, task, [r for r in table["rows"] if r["metric"] == metric], runs, metric)
    ax_acc.set(xscale="log", xlabel="training FLOPs", ylabel="accuracy (dotted: chance)",
               title="task accuracy across the sweep")  # fmt: skip
    ax_brier.set(xscale="log", xlabel="training FLOPs",
                 ylabel="Brier score, lower is better (dotted: uniform guess)",
                 title="a continuous score of the same answers")  # fmt: skip
    for ax in (ax_acc, ax_brier):
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


def _panel(ax, task: str, rows: list[dict], runs: dict, metric: str) -> None:
    """`metric` of `task` at its largest number of demonstrations against each run's FLOPs,
    with the level of a uniform guess dotted (`acc`: 1/n, `brier_score`: 1 - 1/n)."""
    rows = [r for r in rows if r["model"] in runs]
    if not rows:
        return
    k = max(r["num_fewshot"] or 0 for r in rows)
    pts = sorted((runs[r["model"]]["flops"], r["value"]) for r in rows
                 if (r["num_fewshot"] or 0) == k)  # fmt: skip
    line = ax.plot(*zip(*pts), "o-", label=f"{task} (k = {k})")[0]
    if task in CHANCE:
        level = CHANCE[task] if metric == "acc" else 1 - CHANCE[task]
        ax.axhline(level, color=line.get_color(), ls=":", lw=1)


if __name__ == "__main__":
    main()
