"""`stage: embed` — sentence embeddings of texts under an encoder checkpoint (jaxllm's, or an
imported BERT / sentence-transformers model): what a dense retriever indexes.

Each text becomes `[CLS] text [SEP]` (cut to `embed.max_len`, at most the model's
`max_seq_len`), runs through the encoder, and is pooled over its real tokens: `mean` averages
the final features of every token of the row, `[CLS]` and `[SEP]` included (what
sentence-transformers' mean pooling does with the attention mask), `cls` takes `[CLS]`'s
features; `normalize` makes each vector unit length. Rows are sorted by length, right-padded to
a bucket (a power of two >= 16) and batched `batch_size` at a time through a jitted step whose
batch is split over the mesh's data axes, so it compiles once per bucket. Padding is invisible
to the real tokens (the attention mask) and out of the pool.

Writes `embeddings.npy` (float32 [texts, d_model], row i = input i) and `index.jsonl` (one
`{"row", "id", "text"}` per row: `id` is the JSONL's "id" when given, else the row) from
process 0.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxllm.config import Config, resolve_path
from jaxllm.errors import ConfigError, DataError
from jaxllm.interop import load_tokenizer
from jaxllm.jsonl import read_jsonl
from jaxllm.models.heads import mean_pool
from jaxllm.rundir import RunDir, atomic_write_bytes, atomic_write_text
from jaxllm.sharding import make_mesh, use_rules
from jaxllm.sharding.batch import map_rows
from jaxllm.tokenizer.wordpiece import WordPieceTokenizer
from jaxllm.trainers import require_input
from jaxllm.trainers.encoder_model import load_encoder_model


@functools.partial(jax.jit, static_argnames=("graphdef", "pooling", "normalize", "mesh", "rules"))
def embed_batch(
    graphdef: nnx.GraphDef, state: nnx.State, tokens_BL: jax.Array, mask_BL: jax.Array,
    pooling: str = "mean", normalize: bool = True, mesh: Mesh | None = None, rules: str = "dp",
) -> jax.Array:  # fmt: skip
    """[B, D] float32 sentence vectors of an `Encoder` (graphdef + state) for right-padded
    rows (`mask_BL` 1 on real tokens); an all-padding row gives zeros."""
    with use_rules(mesh, rules) if mesh is not None else contextlib.nullcontext():
        encoder = nnx.merge(graphdef, state)
        x_BLD = encoder(tokens_BL, segment_ids_BL=mask_BL.astype(jnp.int32)).astype(jnp.float32)
    if pooling == "cls":
        v_BD = x_BLD[:, 0] * (mask_BL[:, :1] > 0)
    else:
        v_BD = mean_pool(x_BLD, mask_BL)  # the classifier's `pooling: mean` too
    if normalize:  # as torch.nn.functional.normalize: v / max(|v|, 1e-12)
        v_BD = v_BD / jnp.maximum(jnp.linalg.norm(v_BD, axis=-1, keepdims=True), 1e-12)
    return v_BD


def bucket_len(n: int, max_len: int, minimum: int = 16) -> int:
    """The padded length of a batch whose longest row has `n` tokens."""
    return min(max_len, max(minimum, 1 << (max(n, 1) - 1).bit_length()))


def embed_ids(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    rows: Sequence[Sequence[int]],
    pooling: str = "mean",
    normalize: bool = True,
    batch_size: int = 32,
    max_len: int = 512,
    mesh: Mesh | None = None,
    rules: str = "dp",
) -> np.ndarray:
    """[len(rows), D] float32 vectors of token-id rows (in input order; each cut to
    `max_len`). On a `mesh` each batch is split over its data axes (every process passes
    all rows and gets every vector)."""
    rows = [list(r)[:max_len] for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths batch up
    out: np.ndarray | None = None
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        length = bucket_len(max(len(rows[i]) for i in idx), max_len)
        batch = {
            "tokens": np.zeros((batch_size, length), np.int32),
            "mask": np.zeros((batch_size, length), np.int32),
        }
        for j, i in enumerate(idx):
            batch["tokens"][j, : len(rows[i])] = rows[i]
            batch["mask"][j, : len(rows[i])] = 1

        def step(b: dict[str, Any]) -> jax.Array:
            args = (graphdef, state, b["tokens"], b["mask"], pooling, normalize)
            return embed_batch(*args, mesh, rules) if mesh is not None else embed_batch(*args)

        vecs = map_rows(step, batch, mesh, rules) if mesh is not None else np.asarray(step(batch))
        if out is None:
            out = np.zeros((len(rows), vecs.shape[-1]), np.float32)
        out[idx] = vecs[: len(idx)]
    return out if out is not None else np.zeros((0, 0), np.float32)


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
    loaded = load_encoder_model(require_input(cfg, "checkpoint"), mesh, rules, "stage embed")
    graphdef, state = loaded.encoder()
    m = loaded.model
    tok_path = cfg.inputs.tokenizer or loaded.meta.get("tokenizer", "")
    if not tok_path:
        raise ConfigError("config key 'inputs.tokenizer' is empty and the checkpoint names none")
    tok = load_tokenizer(tok_path)
    if not isinstance(tok, WordPieceTokenizer):
        raise ConfigError(f"config key 'inputs.tokenizer': {tok_path} is not a WordPiece tokenizer")
    items = read_texts(ec)
    max_len = min(ec.max_len, m.max_seq_len)
    pieces = tok.encode_batch([it["text"] for it in items])
    rows = [[tok.cls_id, *p[: max_len - 2], tok.sep_id] for p in pieces]  # encode_single
    bad = [t for r in rows for t in r if not 0 <= t < m.vocab_size]
    if bad:
        raise DataError(f"embed: token id {bad[0]} outside the model's vocab ({m.vocab_size})")
    vecs = embed_ids(
        graphdef, state, rows, ec.pooling, ec.normalize, ec.batch_size, max_len, mesh, rules
    )
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
        "checkpoint_kind": loaded.kind,
        "truncated": sum(len(p) + 2 > max_len for p in pieces),
        "outputs": {
            "embeddings": str(out / "embeddings.npy"),
            "index": str(out / "index.jsonl"),
        },
    }
