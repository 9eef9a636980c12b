"""`stage: serve` — an OpenAI-compatible HTTP server over a checkpoint: `/v1/completions`,
`/v1/chat/completions`, `/v1/models`, `/health`, streamed or not, with continuous batching
(jaxllm/serving, jaxllm/generation/engine.py). Any decoder checkpoint serves: a stage's own,
a LoRA run's (merged into plain weights), an imported HF model. Runs until Ctrl-C
(SIGINT) or SIGTERM, which stop it gracefully and finish the run: the summary holds the
engine's counts and the signal (`stopped_by`). `server.json` in the run directory names
the URL."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax

from jaxllm.config import Config
from jaxllm.errors import ConfigError
from jaxllm.generation.engine import Engine, Seq, run_until_done
from jaxllm.interop import load_tokenizer
from jaxllm.rundir import RunDir, atomic_write_text
from jaxllm.serving import Backend, Server
from jaxllm.sharding import make_mesh
from jaxllm.trainers import require_input
from jaxllm.trainers.checkpoint_model import load_frozen_model, quantize_state


def load_served_model(cfg: Config):
    """(graphdef, state, model_cfg, meta) of `inputs.checkpoint`, LoRA merged, its weights
    quantised by the `quantize:` section (int8/int4; a quantised checkpoint is served as it
    is). The engine takes any (graphdef, state) whose merged model has `init_cache` and
    `extend`."""
    ckpt = require_input(cfg, "checkpoint")
    mesh = make_mesh(cfg.mesh)
    graphdef, state, _, m, meta = load_frozen_model(ckpt, mesh, cfg.mesh.rules)
    graphdef, state = quantize_state(graphdef, state, cfg.quantize, mesh, cfg.mesh.rules)
    return graphdef, state, m, meta


def api_key(value: str) -> str:
    """`serve.api_key`: the key itself, or "env:NAME" for the environment variable NAME."""
    if not value.startswith("env:"):
        return value
    name = value.removeprefix("env:")
    if not os.environ.get(name):
        raise ConfigError(f"config key 'serve.api_key': the environment variable {name} is unset")
    return os.environ[name]


def make_backend(cfg: Config) -> tuple[Backend, dict[str, Any]]:
    """The engine (warmed up when `serve.warmup`) and the app's backend for `cfg`."""
    s = cfg.serve
    graphdef, state, m, meta = load_served_model(cfg)
    tok_path = cfg.inputs.tokenizer or meta.get("tokenizer", "")
    if not tok_path:
        raise ConfigError("config key 'inputs.tokenizer' is empty and the checkpoint names none")
    max_len = s.max_len or m.max_seq_len
    if m.positions == "learned" and max_len > m.max_seq_len:
        raise ConfigError(f"config key 'serve.max_len': {max_len} exceeds the model's "
                          f"max_seq_len {m.max_seq_len} (learned positions)")  # fmt: skip
    engine = Engine(graphdef, state, slots=s.slots, max_len=max_len, prefill_batch=s.prefill_batch,
                    max_queue=s.max_queue, min_bucket=s.min_bucket)  # fmt: skip
    tok = load_tokenizer(tok_path)
    backend = Backend(engine, tok, s.model_name or cfg.name, max_tokens=s.max_tokens,
                      api_key=api_key(s.api_key))  # fmt: skip
    if s.warmup:  # compile the decode step and the shortest prefill before listening
        engine.start()
        run_until_done(engine, [Seq(prompt=[tok.eos_id], max_tokens=2)])
    return backend, meta


def run(cfg: Config, run_dir: RunDir) -> dict[str, Any]:
    if jax.process_count() > 1:
        raise ConfigError("stage: serve runs on one host (process_count is "
                          f"{jax.process_count()})")  # fmt: skip
    backend, meta = make_backend(cfg)
    server = Server(backend, cfg.serve.host, cfg.serve.port, log_level="info")
    info = {"url": f"{server.url}/v1", "model": backend.model_name,
            "checkpoint": cfg.inputs.checkpoint, "slots": backend.engine.n_slots,
            "max_len": backend.engine.max_len}  # fmt: skip
    atomic_write_text(run_dir.path / "server.json", json.dumps(info, indent=1) + "\n")
    print(f"serving '{backend.model_name}' at {server.url}/v1 (Ctrl-C stops)", file=sys.stderr)
    server.run()  # returns once a signal (or `should_exit`) has stopped it
    print(f"stopped ({server.stopped_by or 'shut down'}): writing the summary", file=sys.stderr)
    return {**info, "checkpoint_step": meta.get("step"), "stopped_by": server.stopped_by,
            **backend.engine.stats}  # fmt: skip
