"""Stages: one thin module per stage, each exposing `run(cfg, run_dir) -> summary`.

`run_stage` is the single entry point (used by `main` and by `stage: pipeline`): it opens the
run directory, runs the stage and writes `summary.json`. Stage modules are imported lazily so
`stage: data` does not pay for importing jax.

With many processes every stage runs on all of them in step, except the host-only stages
(`HOST_ONLY`: curating data, training a tokenizer), which process 0 runs alone while the
others wait for its summary.
"""

from __future__ import annotations

import difflib
import importlib
from pathlib import Path
from typing import Any

from jaxllm.config import Config
from jaxllm.errors import ConfigError
from jaxllm.rundir import (
    RunDir,
    check_same_across_processes,
    check_same_config,
    is_finished,
    primary_decides,
    read_summary,
)

STAGES = {
    "data": "jaxllm.trainers.data",
    "tokenizer": "jaxllm.trainers.tokenizer",
    "pretrain": "jaxllm.trainers.pretrain",
    "generate": "jaxllm.trainers.generate",
    "sft": "jaxllm.trainers.sft",
    "reward": "jaxllm.trainers.reward",
    "dpo": "jaxllm.trainers.dpo",
    "ppo": "jaxllm.trainers.ppo",
    "grpo": "jaxllm.trainers.grpo",
    "distill": "jaxllm.trainers.distill",
    "import": "jaxllm.trainers.hf_import",
    "export": "jaxllm.trainers.hf_export",
    "score": "jaxllm.trainers.score",
    "quantize": "jaxllm.trainers.quantize",
    "scaling": "jaxllm.trainers.scaling",
    "mlm": "jaxllm.trainers.mlm",
    "classify": "jaxllm.trainers.classify",
    "embed": "jaxllm.trainers.embed",
    "eval": "jaxllm.trainers.eval",
    "chat": "jaxllm.trainers.chat",
    "serve": "jaxllm.trainers.serve",
    "pipeline": "jaxllm.trainers.pipeline",
}


HOST_ONLY = {"data", "tokenizer"}  # no devices: process 0 does the work and writes it


def check_stage(name: str, key: str = "stage") -> None:
    """`name` is a stage; `key` is the config key the message names."""
    if name not in STAGES:
        close = difflib.get_close_matches(name, list(STAGES), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(
            f"config key '{key}': unknown stage '{name}'; {hint}(stages: {', '.join(STAGES)})"
        )


def check_stages(cfg: Config, prefix: str = "") -> None:
    """`cfg.stage` and, for a pipeline, every stage's (nested pipelines included) is a
    stage: a misspelt stage fails before the stages ahead of it run."""
    check_stage(cfg.stage, f"{prefix}stage")
    if cfg.stage == "pipeline":
        for i, sub in enumerate(cfg.pipeline):
            check_stages(sub, f"{prefix}pipeline.{i}.")


def run_stage(cfg: Config, reuse_finished: bool = False) -> dict[str, Any]:
    """Runs one stage in its run directory and returns its summary.

    With `reuse_finished` (pipelines), a finished run of the same config is not run again:
    its summary (and so its outputs) is returned as it is. With many processes, they must
    all have the same config, and process 0's look at the run directory counts for all.
    """
    check_stages(cfg)
    check_same_across_processes(cfg)
    if reuse_finished and not cfg.overwrite:
        done = primary_decides(_finished_summary, cfg)
        if done is not None:
            return done
    run_dir = RunDir.open(cfg)
    module = importlib.import_module(STAGES[cfg.stage])
    if cfg.stage in HOST_ONLY:
        summary = primary_decides(module.run, cfg, run_dir)
    else:
        summary = module.run(cfg, run_dir)
    return run_dir.finish(summary)


def _finished_summary(cfg: Config) -> dict[str, Any] | None:
    """The summary of a finished run of this config in `cfg.run_dir`, else None."""
    if not is_finished(cfg.run_dir):
        return None
    check_same_config(cfg.run_dir, cfg)
    return read_summary(cfg.run_dir)


def require_input(cfg: Config, key: str) -> Path:
    """The path in `inputs.<key>`, with a message that says how to provide it when empty."""
    value = getattr(cfg.inputs, key)
    if not value:
        raise ConfigError(
            f"config key 'inputs.{key}' is empty: set it, or run this stage inside a "
            "`stage: pipeline` after the stage that produces it"
        )
    path = Path(value)
    if not path.exists():
        raise ConfigError(f"config key 'inputs.{key}': {path} does not exist")
    return path


def data_file(value: str, key: str) -> Path:
    """The file a data-file config key names (`asset:` paths resolved), which must exist;
    `key` is the dotted key for the message, e.g. 'reward.val_file'."""
    from jaxllm.config import resolve_path

    path = resolve_path(value)
    if not path.is_file():
        raise ConfigError(f"config key '{key}': {path} not found")
    return path
