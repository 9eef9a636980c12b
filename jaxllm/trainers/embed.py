"""`stage: embed` — sentence embeddings of texts under an encoder checkpoint (jaxllm's, or an
imported BERT / sentence-transformers model): what a dense retriever indexes. The vectors are
`trainers/embedder.py`'s (`[CLS] text [SEP]`, mean or `[CLS]` pooling, optionally unit
length; batched and jitted, split over the mesh).

Writes `embeddings.npy` (float32 [texts, d_model], row i = input i) and `index.jsonl` (one
`{"row", "id", "text"}` per row: `id` is the JSONL's "id" when given, else the row) from
process 0.
"""

from __future__ import annotations

import io
import json
from typing import Any

import jax
import numpy as np

from jaxllm.config import Config, resolve_path
from jaxllm.errors import ConfigError, DataError
from jaxllm.jsonl import read_jsonl
from jaxllm.rundir import RunDir, atomic_write_bytes, atomic_write_text
from jaxllm.sharding import make_mesh
from jaxllm.trainers import require_input
from jaxllm.trainers.embedder import TextEmbedder


def read_texts(ec: Any) -> list[dict[str, Any]]:
    """`embed.texts` plus the lines of `embed.texts_file` (JSONL: "text", optional "id")."""
    items: list[dict[str, Any]] = [{"id": i, "text": t} for i, t in enumerate(ec.texts)]
    if ec.texts_file:
        path = resolve_path(ec.texts_file)
        if not path.is_file():
            raise ConfigError(f"config key 'embed.texts_file': {path} not found")
        for line, obj in read_jsonl(path):
            if not isinstance(obj.get("text"), str):
                raise DataError(f'{path}:{line}: expected a JSON object with a "text" string')
            items.append({"id": obj.get("id", len(items)), "text": obj["text"]})
    if not items:
        raise ConfigError("config key 'embed.texts': give texts or a texts_file")
    return items


def run(cfg: Config, run_dir: RunDir) -> dict[str, Any]:
    ec = cfg.embed  # type: ignore[attr-defined]
    mesh, rules = make_mesh(cfg.mesh), cfg.mesh.rules
    embedder = TextEmbedder.load(
        require_input(cfg, "checkpoint"), mesh, rules, cfg.inputs.tokenizer, ec.max_len
    )
    items = read_texts(ec)
    texts = [it["text"] for it in items]
    vecs = embedder(texts, ec.pooling, ec.normalize, ec.batch_size)
    out = run_dir.path
    if jax.process_index() == 0:
        buf = io.BytesIO()
        np.save(buf, vecs)
        atomic_write_bytes(out / "embeddings.npy", buf.getvalue())
        index = "".join(
            json.dumps({"row": i, "id": it["id"], "text": it["text"]}, ensure_ascii=False) + "\n"
            for i, it in enumerate(items)
        )
        atomic_write_text(out / "index.jsonl", index)
    return {
        "texts": len(items),
        "dim": int(vecs.shape[1]),
        "pooling": ec.pooling,
        "normalize": ec.normalize,
        "checkpoint_kind": embedder.kind,
        "truncated": embedder.rows(texts)[1],
        "outputs": {
            "embeddings": str(out / "embeddings.npy"),
            "index": str(out / "index.jsonl"),
        },
    }
