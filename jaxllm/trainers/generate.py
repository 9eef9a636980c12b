"""`stage: generate` — sample completions from a checkpoint with the KV-cache engine and write
`generations.jsonl` (prompt, completion, token count) plus samples in the summary. The model
is loaded on the whole mesh (`mesh:`), each batch of prompts split over its data axes."""

from __future__ import annotations

import json
import time
from typing import Any

import jax

from jaxllm.config import Config, GenerateConfig, replace, resolve_path
from jaxllm.errors import ConfigError, DataError
from jaxllm.generation import generate_text
from jaxllm.interop import load_tokenizer
from jaxllm.jsonl import read_jsonl
from jaxllm.rundir import RunDir, atomic_write_text
from jaxllm.sharding import make_mesh
from jaxllm.tokenizer.chat import END_TOKEN, STRUCTURAL, render_text
from jaxllm.trainers import require_input
from jaxllm.trainers.lm import load_checkpoint_model, quantize_state


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


def chat_prompts(prompts: list[str], gen: GenerateConfig) -> tuple[list[str], GenerateConfig]:
    """With `generate.chat`, each prompt becomes a user turn of the chat template (after the
    system prompt, if any) ending in the assistant's tag; the template's text carries its
    own `<s>`, and the answer stops at `<|end|>` (or any other structural token: a role
    tag, `<s>`) as well as at `generate.stop`."""
    if not gen.chat:
        return prompts, gen
    system = [{"role": "system", "content": gen.system}] if gen.system else []
    texts = [
        render_text([*system, {"role": "user", "content": p}], add_generation_prompt=True)
        for p in prompts
    ]
    stop = tuple(dict.fromkeys((*gen.stop, END_TOKEN, *STRUCTURAL)))
    return texts, replace(gen, add_bos=False, stop=stop)


def run(cfg: Config, run_dir: RunDir) -> dict[str, Any]:
    ckpt = require_input(cfg, "checkpoint")
    mesh, rules = make_mesh(cfg.mesh), cfg.mesh.rules  # prompts split over the data axes
    graphdef, state, model_cfg, meta = load_checkpoint_model(ckpt, mesh, rules)
    graphdef, state = quantize_state(graphdef, state, cfg.quantize, mesh, rules)
    tok_path = cfg.inputs.tokenizer or meta.get("tokenizer", "")
    if not tok_path:
        raise ConfigError("config key 'inputs.tokenizer' is empty and the checkpoint names none")
    tok = load_tokenizer(tok_path)
    prompts = read_prompts(cfg)
    texts, gen = chat_prompts(prompts, cfg.generate)
    t0 = time.perf_counter()
    completions = generate_text(
        graphdef, state, tok, texts, gen, key=jax.random.key(cfg.seed), mesh=mesh, rules=rules
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
