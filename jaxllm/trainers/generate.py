"""`stage: generate` — sample completions from a checkpoint with the KV-cache engine and write
`generations.jsonl` (prompt, completion, token count) plus samples in the summary."""

from __future__ import annotations

import json
import time
from typing import Any

import jax

from jaxllm.config import Config, MeshConfig, resolve_path
from jaxllm.errors import ConfigError, DataError
from jaxllm.generation import generate_text
from jaxllm.interop import load_tokenizer
from jaxllm.jsonl import read_jsonl
from jaxllm.rundir import RunDir, atomic_write_text
from jaxllm.sharding import make_mesh
from jaxllm.trainers import require_input
from jaxllm.trainers.lm import load_checkpoint_model


def read_prompts(cfg: Config) -> list[str]:
    """Prompts from `generate.prompts` and/or a JSONL `generate.prompts_file` ("prompt" key)."""
    prompts = list(cfg.generate.prompts)
    if cfg.generate.prompts_file:
        path = resolve_path(cfg.generate.prompts_file)
        if not path.is_file():
            raise ConfigError(f"config key 'generate.prompts_file': {path} not found")
        for i, obj in read_jsonl(path):
            if not isinstance(obj.get("prompt"), str):
                raise DataError(f'{path}:{i}: expected a JSON object with a "prompt" string')
            prompts.append(obj["prompt"])
    if not prompts:
        raise ConfigError("config key 'generate.prompts': give prompts or a prompts_file")
    return prompts


def run(cfg: Config, run_dir: RunDir) -> dict[str, Any]:
    ckpt = require_input(cfg, "checkpoint")
    # every process generates on one of its own devices (the same completions: same seed);
    # process 0 writes them
    mesh = make_mesh(MeshConfig(data=1), jax.local_devices()[:1])
    graphdef, state, model_cfg, meta = load_checkpoint_model(ckpt, mesh)
    tok_path = cfg.inputs.tokenizer or meta.get("tokenizer", "")
    if not tok_path:
        raise ConfigError("config key 'inputs.tokenizer' is empty and the checkpoint names none")
    tok = load_tokenizer(tok_path)
    prompts = read_prompts(cfg)
    t0 = time.perf_counter()
    completions = generate_text(
        graphdef, state, tok, prompts, cfg.generate, key=jax.random.key(cfg.seed)
    )
    secs = time.perf_counter() - t0
    rows = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
    if jax.process_index() == 0:
        atomic_write_text(
            run_dir.path / "generations.jsonl",
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
        )
    return {
        "prompts": len(prompts),
        "checkpoint_step": meta.get("step"),
        "seconds_generating": round(secs, 2),
        "samples": rows[:8],
        "outputs": {"generations": str(run_dir.path / "generations.jsonl")},
    }
