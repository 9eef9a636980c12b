"""Sentence vectors of texts under an encoder checkpoint (jaxllm's, or an imported BERT /
sentence-transformers model): what `stage: embed` writes and what dense retrieval
(`stage: eval`, a task's `retrieval.method: dense`) indexes and searches with.

Each text becomes `[CLS] text [SEP]` (cut to `max_len`, at most the model's `max_seq_len`),
runs through the encoder, and is pooled over its real tokens: `mean` averages the final
features of every token of the row, `[CLS]` and `[SEP]` included (what sentence-transformers'
mean pooling does with the attention mask), `cls` takes `[CLS]`'s features; `normalize` makes
each vector unit length. Rows are sorted by length, right-padded to a bucket (a power of two
>= 16) and batched `batch_size` at a time through a jitted step whose batch is split over the
mesh's data axes, so it compiles once per bucket. Padding is invisible to the real tokens
(the attention mask) and out of the pool.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxllm.errors import ConfigError
from jaxllm.generation.scoring import bucket_len
from jaxllm.interop import load_tokenizer
from jaxllm.models.heads import mean_pool
from jaxllm.sharding import use_rules
from jaxllm.sharding.batch import map_rows
from jaxllm.tokenizer.wordpiece import WordPieceTokenizer
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


@dataclass
class TextEmbedder:
    """An encoder checkpoint's `Encoder` with its WordPiece tokenizer: texts → vectors, the
    embed stage's path (`[CLS] text [SEP]`, cut to `max_len`, batched through `embed_ids`).
    Dense retrieval (`stage: eval`, a task's `retrieval.method: dense`) embeds with it too."""

    graphdef: nnx.GraphDef
    state: nnx.State
    tok: WordPieceTokenizer
    max_len: int
    kind: str
    mesh: Mesh | None = None
    rules: str = "dp"

    @classmethod
    def load(
        cls, ckpt_dir: Path, mesh: Mesh, rules: str = "dp", tokenizer: str = "",
        max_len: int = 512, why: str = "stage embed", key: str = "config key 'inputs.checkpoint'",
        tok_key: str = "config key 'inputs.tokenizer'",
    ) -> TextEmbedder:  # fmt: skip
        """`key` and `tok_key` name the setting in messages (an encoder is needed for `why`)."""
        loaded = load_encoder_model(ckpt_dir, mesh, rules, why, key)
        tok_path = tokenizer or loaded.meta.get("tokenizer", "")
        if not tok_path:
            raise ConfigError(f"{tok_key} is empty and the checkpoint {ckpt_dir} names none")
        tok = load_tokenizer(tok_path)
        if not isinstance(tok, WordPieceTokenizer):
            raise ConfigError(f"{tok_key}: {tok_path} is not a WordPiece tokenizer")
        graphdef, state = loaded.encoder()
        m = loaded.model
        if tok.vocab_size > m.vocab_size:
            raise ConfigError(f"{tok_key}: {tok_path} has {tok.vocab_size} tokens, the "
                              f"encoder {ckpt_dir} {m.vocab_size}")  # fmt: skip
        return cls(graphdef, state, tok, min(max_len, m.max_seq_len), loaded.kind, mesh, rules)

    def rows(self, texts: Sequence[str]) -> tuple[list[list[int]], int]:
        """`[CLS] pieces [SEP]` per text (as `encode_single`), and how many were cut."""
        pieces = self.tok.encode_batch(list(texts))
        rows = [[self.tok.cls_id, *p[: self.max_len - 2], self.tok.sep_id] for p in pieces]
        return rows, sum(len(p) + 2 > self.max_len for p in pieces)

    def __call__(
        self, texts: Sequence[str], pooling: str = "mean", normalize: bool = True,
        batch_size: int = 32,
    ) -> np.ndarray:  # fmt: skip
        """[len(texts), D] float32 vectors, row i = text i."""
        rows, _ = self.rows(texts)
        return embed_ids(self.graphdef, self.state, rows, pooling, normalize, batch_size,
                         self.max_len, self.mesh, self.rules)  # fmt: skip


def retrieval_embedder(mesh: Mesh, rules: str = "dp", batch_size: int = 64):
    """An `evaluation.runner.Embedder`: loads each encoder checkpoint once (its own tokenizer,
    mean pooling, unit vectors) and returns its texts → vectors function."""

    @functools.lru_cache(maxsize=4)
    def load(ckpt_dir: Path, key: str):
        embedder = TextEmbedder.load(ckpt_dir, mesh, rules, why="dense retrieval", key=key,
                                     tok_key=f"{key} (its tokenizer)")  # fmt: skip
        return functools.partial(embedder, pooling="mean", normalize=True, batch_size=batch_size)

    return load
