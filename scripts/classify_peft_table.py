"""The PEFT comparison table from finished `stage: classify` run directories.

    python scripts/classify_peft_table.py runs/tiny_classify_peft/*-*/

One markdown row per run, from its summary.json, config.yaml and metrics.jsonl: method, lr,
test accuracy / macro-F1 (val in brackets), trainable parameters (share of the model), the
newest checkpoint's bytes (the summary's `checkpoint_bytes`: the whole train state the method
saves, optimizer moments included) and the checkpoints directory on disk (every kept step),
the median logged step time (each log line averages `log_every` steps; the first line, which
includes compilation, is left out) and the run's wall seconds.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import yaml


def row(run: Path) -> str:
    s = json.loads((run / "summary.json").read_text())
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    method = (cfg.get("peft") or {}).get("method", "none")
    lr = cfg["train"]["optim"]["lr"]
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    times = [m["step_time"] for m in steps if "step_time" in m][1:]
    dir_bytes = sum(f.stat().st_size for f in (run / "checkpoints").rglob("*") if f.is_file())
    return (
        f"| {method if method != 'none' else 'full'} | {lr:g} "
        f"| {s['test_accuracy']:.3f} / {s['test_macro_f1']:.3f} "
        f"({s['val_accuracy']:.3f} / {s['val_macro_f1']:.3f}) "
        f"| {s['trainable_params']:,} ({100 * s['trainable_share']:.1f} %) "
        f"| {s['checkpoint_bytes'] / 1e6:.2f} MB | {dir_bytes / 1e6:.2f} MB "
        f"| {1e3 * statistics.median(times):.0f} ms | {s['seconds']:.0f} s |"
    )


def main(argv: list[str]) -> None:
    print(
        "| method | lr | test acc. / macro-F1 (val) | trainable params | checkpoint "
        "| checkpoints dir | step (median) | wall |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for arg in argv:
        print(row(Path(arg)))


if __name__ == "__main__":
    main(sys.argv[1:])
