"""`stage: pipeline` — runs stage configs in order, handing each one's outputs to the next.

Every stage's summary carries `outputs` (e.g. `data_dir`, `tokenizer`, `checkpoint`); a later
stage whose `inputs.<key>` is empty receives the latest one. Stages that already finished with
the same config (a pipeline resumed after a crash) are not run again.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxllm.config import Config, replace
from jaxllm.rundir import RunDir


def run(cfg: Config, run_dir: RunDir) -> dict[str, Any]:
    from jaxllm.trainers import run_stage
    from jaxllm.training.preemption import check_deferred, clear_deferred

    clear_deferred()
    outputs: dict[str, str] = {}
    stages = []
    for i, sub in enumerate(cfg.pipeline, start=1):
        sub = fill_inputs(sub, outputs)
        if i > 1:  # a notice the last stage's loop got at its end: stop between stages
            check_deferred(f"stage {i} ({sub.name})")
        print(
            f"[pipeline {cfg.name}] {i}/{len(cfg.pipeline)}: {sub.stage} ({sub.name}) → {sub.run_dir}"
        )
        summary = run_stage(sub, reuse_finished=True)
        outputs.update(summary.get("outputs", {}))
        stages.append(
            {"stage": sub.stage, "name": sub.name, "run_dir": str(sub.run_dir), "summary": summary}
        )
    return {"stages": stages, "outputs": outputs}


def fill_inputs(cfg: Config, outputs: dict[str, str]) -> Config:
    """Fills each empty `inputs.<key>` from the outputs of the stages run so far — except a
    pretrain stage's checkpoint: pretraining starts from fresh weights unless its config names
    a checkpoint (continued pretraining is asked for, never inherited)."""
    skip = {"checkpoint"} if cfg.stage == "pretrain" else set()
    changes = {
        f"inputs.{f.name}": outputs[f.name]
        for f in dataclasses.fields(cfg.inputs)
        if not getattr(cfg.inputs, f.name) and outputs.get(f.name) and f.name not in skip
    }
    return replace(cfg, **changes) if changes else cfg
