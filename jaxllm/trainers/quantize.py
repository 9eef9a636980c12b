"""`stage: quantize` — a float checkpoint (`inputs.checkpoint`: pretrained, fine-tuned with
LoRA merged, or imported from HF) → a quantised checkpoint (`quantize:`, models/quant.py):
int8 / int4 values and float32 scales written by orbax, like any checkpoint (never pickle).

The checkpoint holds `{"params", "step"}` only (nothing trains it) and its metadata carries
the `quantize` section, so every stage that loads a model by path (generate, score, eval,
chat, a QLoRA sft/dpo base) rebuilds the quantised structure and restores into it. The
summary reports bytes on disk and in memory against the float input, and which weights
were quantised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import Config, to_dict
from jaxllm.errors import ConfigError
from jaxllm.models.peft import methods_in
from jaxllm.models.quant import QuantWeight, is_quantized, quant_bytes
from jaxllm.rundir import RunDir
from jaxllm.sharding import make_mesh
from jaxllm.trainers import require_input
from jaxllm.trainers.lm import (
    checkpoint_dir,
    load_frozen_model,
    quantize_state,
    stage_tokenizer,
)
from jaxllm.training.checkpoint import Checkpointer


def run(cfg: Config, run_dir: RunDir) -> dict[str, Any]:
    q = cfg.quantize
    if not q.enabled:
        raise ConfigError("config key 'quantize.method': none; set int8 or int4")
    ckpt_in = require_input(cfg, "checkpoint")
    mesh, rules = make_mesh(cfg.mesh), cfg.mesh.rules
    graphdef, state, _, m, meta = load_frozen_model(ckpt_in, mesh, rules)
    if is_quantized(state):
        raise ConfigError(
            f"config key 'inputs.checkpoint': {ckpt_in} is already quantised; quantise its "
            "float source instead"
        )
    left = [method.name for method in methods_in(state)]
    if left:
        raise ConfigError(
            f"config key 'inputs.checkpoint': {ckpt_in} was trained with peft.method "
            f"{left[0]}, which cannot be merged into the weights to quantise; quantise its "
            "base and put the method on top (QLoRA), or train with lora"
        )
    _, tok_path = stage_tokenizer(cfg, meta, m)  # kept here: the run dir loads alone
    float_bytes = quant_bytes(state)["total"]
    graphdef, qstate = quantize_state(graphdef, state, q, mesh, rules)
    del state
    out = checkpoint_dir(Path(run_dir.path))
    step = int(meta.get("step") or 0)
    ckpt = Checkpointer(out, keep=1, async_save=False, save_concurrent_gb=1)
    params = nnx.state(nnx.merge(graphdef, qstate), nnx.Param)
    saved_meta = {
        "config": to_dict(cfg),
        "model": to_dict(m),
        "tokenizer": tok_path,
        "step": step,
        "quantize": to_dict(q),
        "source_checkpoint": str(Path(ckpt_in).absolute()),
    }
    ckpt.save(step, {"params": params, "step": jnp.asarray(step, jnp.int32)}, saved_meta)
    ckpt.close()
    paths = _quantized_paths(qstate)
    return {
        "method": q.method,
        "group_size": q.group_size if q.method == "int4" else None,
        "quantized_weights": len(paths),
        "quantized_paths": paths[:8],
        "bytes_in_memory": quant_bytes(qstate),
        "float_bytes_in_memory": float_bytes,
        "bytes_on_disk": dir_bytes(out / str(step)),
        # the input as saved: a training run's checkpoint also holds Adam's moments
        "input_bytes_on_disk": dir_bytes(_step_dir(Path(ckpt_in))),
        "outputs": {"checkpoint": str(out)},
    }


def _quantized_paths(state: nnx.State) -> list[str]:
    flat = nnx.to_flat_state(nnx.filter_state(state, QuantWeight))
    return [".".join(str(p) for p in path) for path, _ in flat]


def _step_dir(ckpt_dir: Path) -> Path:
    ckpt = Checkpointer(ckpt_dir, async_save=False)
    step = ckpt.latest_step()
    ckpt.close()
    return ckpt_dir / str(step)


def dir_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 if none; process 0's view)."""
    if jax.process_index() != 0 or not path.is_dir():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
