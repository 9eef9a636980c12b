"""`stage: data` — curate the configured sources into cleaned train/val JSONL shards."""

from __future__ import annotations

from typing import Any

from jaxllm.config import Config
from jaxllm.data.curate import curate
from jaxllm.errors import ConfigError
from jaxllm.rundir import RunDir


def run(cfg: Config, run_dir: RunDir) -> dict[str, Any]:
    if not cfg.data.sources:
        raise ConfigError("config key 'data.sources' is empty: list at least one corpus file")
    report = curate(cfg.data, run_dir.path, seed=cfg.seed, progress=cfg.progress)
    totals = report.get("totals", {})
    return {
        **{k: v for k, v in totals.items() if isinstance(v, int | float)},
        "report": "data_report.json",
        "outputs": {"data_dir": str(run_dir.path)},
    }
