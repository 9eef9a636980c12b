"""Prompt lists of any length through the `Sampler` in fixed-size batches: the one batching
loop that text generation, greedy evaluation and teacher answers share.

Every process passes the same full list; each batch is padded with copies of its last
prompt to one size (one compiled program for every batch, split evenly over the mesh),
each process samples its own rows of it, and every process gets every result back (a
gather of the generated ids: callers decode and score them on the host).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Protocol

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxllm.config import GenerateConfig
from jaxllm.generation.sampler import Sampler, SampleResult, to_result
from jaxllm.sharding.batch import to_host


def sample_all(
    sampler: Sampler,
    state: nnx.State,
    prompts: Sequence[Sequence[int]],
    *,
    batch_size: int,
    key_for: Callable[[int], jax.Array],
    **kw,
) -> SampleResult:
    """Samples every prompt, `batch_size` at a time (the same batches on any mesh: each is
    padded to split over it); batch n draws with `key_for(n)`. `kw` as `Sampler.generate`."""
    size = min(batch_size, len(prompts))
    rows = -(-size // sampler.shards) * sampler.shards
    parts: list[SampleResult] = []
    for n, start in enumerate(range(0, len(prompts), size)):
        chunk = list(prompts[start : start + size])
        padded = chunk + [chunk[-1]] * (rows - len(chunk))
        out = sampler.generate(state, padded[sampler.my_rows(rows)], key=key_for(n), **kw)
        parts.append(to_result(*(np.asarray(x)[: len(chunk)] for x in to_host(tuple(out)))))
    fields = [f.name for f in dataclasses.fields(SampleResult)]
    return SampleResult(*(sum((getattr(p, f) for p in parts), []) for f in fields))


class TextTokenizer(Protocol):
    def encode(self, text: str, add_bos: bool = ...) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


def response_texts(tokenizer: TextTokenizer, res: SampleResult) -> list[str]:
    """Each row's generated text without the stop token that ended it."""
    return [
        tokenizer.decode(toks[:-1] if stopped else toks)
        for toks, stopped in zip(res.tokens, res.stopped)
    ]


def generate_text(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokenizer: TextTokenizer,
    prompts: Sequence[str],
    cfg: GenerateConfig,
    *,
    key: jax.Array,
    stop_ids: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: str = "dp",
) -> list[str]:
    """Completions (the text after each prompt) with the settings of `cfg`, on `mesh` when
    given (every process gets every completion).

    Stop strings in `cfg.stop` that name a special token or encode to one token become stop
    ids, and so do the tokenizer's EOS and any other end ids it has (`eos_ids`: a HF model's
    generation_config.json list) unless `stop_ids` is given; every completion is also cut at
    the first stop string. A BOS goes first (`cfg.add_bos`) where the tokenizer has one.
    Prompts run in batches of `cfg.batch_size`; batch n draws with
    `fold_in(key, n * batch_size)`.
    """
    if stop_ids is None:
        named = getattr(tokenizer, "special_ids", {})  # (an HF model's <s> alias: its BOS)
        encoded = (
            [named[s]] if s in named else tokenizer.encode(s, add_bos=False) for s in cfg.stop
        )
        stop_ids = [ids[0] for ids in encoded if len(ids) == 1]
        eos = getattr(tokenizer, "eos_ids", [getattr(tokenizer, "eos_id", -1)])
        stop_ids += [i for i in eos if i >= 0 and i not in stop_ids]  # EOS always ends one
    add_bos = cfg.add_bos and getattr(tokenizer, "bos_id", 0) >= 0  # (Qwen2 has no BOS)
    ids = [tokenizer.encode(p, add_bos=add_bos) for p in prompts]
    res = sample_all(
        Sampler(graphdef, mesh=mesh, rules=rules), state, ids, batch_size=cfg.batch_size,
        key_for=lambda n: jax.random.fold_in(key, n * cfg.batch_size),
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
        top_p=cfg.top_p, stop_ids=stop_ids,
    )  # fmt: skip
    return [_cut(text, cfg.stop) for text in response_texts(tokenizer, res)]


def _cut(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    cut = min((i for s in stops if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]
