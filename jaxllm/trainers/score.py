"""`stage: score` — per-token log-probs, total log-likelihood and perplexity of texts (or
token ids) under a checkpoint; writes `scores.jsonl`, one object per input.

Every token but the first is scored, given the tokens before it (texts get the tokenizer's
BOS first when it has one, so their first real token is scored too). Rows are right-padded to
a bucket (the next power of two >= 16, capped at `score.max_len`) and batched `batch_size` at a
time, so the jitted scorer compiles once per bucket; longer inputs are cut to `max_len`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxllm.config import Config, resolve_path
from jaxllm.errors import ConfigError, DataError
from jaxllm.generation.scoring import row_len, score_batch
from jaxllm.interop import load_tokenizer
from jaxllm.jsonl import read_jsonl
from jaxllm.rundir import RunDir, atomic_write_text
from jaxllm.sharding import make_mesh
from jaxllm.sharding.batch import map_rows
from jaxllm.trainers import require_input
from jaxllm.trainers.lm import load_checkpoint_model, quantize_state


def score_ids(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    rows: Sequence[Sequence[int]],
    batch_size: int = 8,
    max_len: int = 512,
    mesh: Mesh | None = None,
    rules: str = "dp",
) -> list[dict[str, Any]]:
    """Scores token-id rows (in input order): logprobs, total_logprob, num_tokens, ppl. On a
    `mesh` each batch is split over its data axes (every process passes all rows and gets
    every result)."""
    rows = [list(r)[:max_len] for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths batch up
    out: list[dict[str, Any]] = [{} for _ in rows]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        length = row_len(max(len(rows[i]) for i in idx), max_len)
        tokens = np.zeros((batch_size, length), np.int32)
        mask = np.zeros((batch_size, length), np.int32)
        for j, i in enumerate(idx):
            tokens[j, : len(rows[i])] = rows[i]
            mask[j, : len(rows[i])] = 1
        logp = _score_rows(graphdef, state, {"tokens": tokens, "mask": mask}, mesh, rules)
        for j, i in enumerate(idx):
            out[i] = _row_result(logp[j, 1 : len(rows[i])])
    return out


def _score_rows(graphdef, state, batch: dict[str, np.ndarray], mesh, rules: str) -> np.ndarray:
    """`score_batch` of a host batch: split over the mesh, every row back on every process."""
    if mesh is None:
        return np.asarray(score_batch(graphdef, state, batch["tokens"], batch["mask"]))
    return map_rows(
        lambda b: score_batch(graphdef, state, b["tokens"], b["mask"], mesh, rules),
        batch, mesh, rules,
    )  # fmt: skip


def _row_result(logp: np.ndarray) -> dict[str, Any]:
    total, n = float(logp.sum(dtype=np.float64)), int(logp.size)
    return {
        "logprobs": [float(x) for x in logp],
        "total_logprob": total,
        "num_tokens": n,
        "ppl": math.exp(-total / n) if n else None,
    }


def read_inputs(cfg: Any) -> list[dict[str, Any]]:
    """`score.texts` plus the lines of `score.texts_file` (JSONL with "text" or "ids")."""
    items: list[dict[str, Any]] = [{"text": t} for t in cfg.texts]
    if cfg.texts_file:
        path = resolve_path(cfg.texts_file)
        if not path.is_file():
            raise ConfigError(f"config key 'score.texts_file': {path} not found")
        items.extend(_parse_record(obj, path, i) for i, obj in read_jsonl(path))
    if not items:
        raise ConfigError("config key 'score.texts': give texts or a texts_file")
    return items


def _parse_record(obj: dict[str, Any], path: Path, i: int) -> dict[str, Any]:
    if isinstance(obj.get("text"), str):
        return {"text": obj["text"]}
    ids = obj.get("ids")
    if isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        return {"ids": ids}
    raise DataError(f'{path}:{i}: expected a JSON object with a "text" string or "ids" list')


def run(cfg: Config, run_dir: RunDir) -> dict[str, Any]:
    sc = cfg.score  # type: ignore[attr-defined]
    ckpt = require_input(cfg, "checkpoint")
    mesh, rules = make_mesh(cfg.mesh), cfg.mesh.rules  # batches split over the data axes
    graphdef, state, m, meta = load_checkpoint_model(ckpt, mesh, rules)
    graphdef, state = quantize_state(graphdef, state, cfg.quantize, mesh, rules)
    items = read_inputs(sc)
    rows = _to_ids(items, cfg.inputs.tokenizer or meta.get("tokenizer", ""), m.vocab_size)
    max_len = min(sc.max_len, m.max_seq_len) if m.positions == "learned" else sc.max_len
    results = score_ids(graphdef, state, rows, sc.batch_size, max_len, mesh, rules)
    lines = [
        json.dumps({**it, **res}, ensure_ascii=False) + "\n" for it, res in zip(items, results)
    ]
    if jax.process_index() == 0:
        atomic_write_text(run_dir.path / "scores.jsonl", "".join(lines))
    total = sum(r["total_logprob"] for r in results)
    n = sum(r["num_tokens"] for r in results)
    return {
        "texts": len(items),
        "tokens_scored": n,
        "total_logprob": total,
        "ppl": math.exp(-total / n) if n else None,
        "truncated": sum(len(r) > max_len for r in rows),
        "outputs": {"scores": str(run_dir.path / "scores.jsonl")},
    }


def _to_ids(items: list[dict[str, Any]], tok_path: str, vocab: int) -> list[list[int]]:
    """Token ids per input (texts tokenized with BOS first when the tokenizer has one)."""
    tok = None
    if any("text" in it for it in items):
        if not tok_path:
            raise ConfigError(
                "config key 'inputs.tokenizer' is empty and the checkpoint names none"
            )
        tok = load_tokenizer(tok_path)
    rows = []
    for it in items:
        ids = it["ids"] if "ids" in it else tok.encode(it["text"], add_bos=tok.bos_id >= 0)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise DataError(f"score input: token id {bad[0]} outside the model's vocab ({vocab})")
        rows.append(ids)
    return rows
