"""Plots a tool-using GRPO run (`configs/tiny_grpo_tool.yaml`): per iteration, the share of
sampled episodes that call the tool (`tool_call`, an `eval_rules` rate) and their accuracy,
with the greedy held-out figures before and after as end points.

    python scripts/plot_tool_rl.py runs/tiny_grpo_tool [--out docs/tool_rl_tiny.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jaxllm.training.metrics import read_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--out", default="docs/tool_rl_tiny.png")
    args = parser.parse_args()
    run = Path(args.run_dir)
    rows = read_metrics(run / "metrics.jsonl")
    summary = json.loads((run / "summary.json").read_text())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    last = rows[-1]["step"]
    for key, label, color in (("tool_call", "tool-call rate", "C0"),
                              ("accuracy", "accuracy", "C1")):  # fmt: skip
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], "-", color=color,
                label=f"{label} (sampled episodes)")  # fmt: skip
        before, after = summary[f"greedy_{key}_before"], summary[f"greedy_{key}_after"]
        ax.plot([0, last], [before, after], "o--", color=color, alpha=0.6,
                label=f"{label}, greedy held-out: {before:.2f} → {after:.2f}")  # fmt: skip
    ax.set_xlabel("GRPO iteration")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("GRPO with a calculator tool (tiny model, three-digit sums)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
