"""A checkpoint as an evaluation backend (`jaxllm.evaluation.runner.Backend`): text requests
in, batched through the jitted scorer and the KV-cache sampler on the mesh. `stage: eval` and
the lm-evaluation-harness bridge share it, so the two give the same numbers.

- Plain-text contexts get the tokenizer's BOS first (its EOS for a model without a BOS, as
  lm-eval's HF model starts a rolling text with its prefix token), unless they already start
  with it. A chat-template text (`<s>` then a role token) gets nothing: it carries its own
  `<s>`, which encodes to nothing for a model without a BOS, so it is encoded exactly as SFT
  trained on it and as chat / serve / generate prompt it.
- A (context, continuation) pair is tokenized as lm-eval's Hugging Face model does: trailing
  spaces of the context move to the continuation, the whole string is encoded once and the
  continuation is what follows the context's own encoding.
- A context too long for `max_len` tokens loses its start (left truncation: the end, where
  the question is, stays), counted per request; with `truncation: error` it raises `TooLong`.
  A continuation that cannot fit at all always raises.
- A text scored whole (`loglikelihood_rolling`) runs in lm-eval's disjoint rolling windows.
- Every process passes the same requests and gets every answer (rows split over the mesh).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxllm.config import MeshConfig, QuantizeConfig
from jaxllm.errors import ConfigError
from jaxllm.evaluation.metrics import rolling_windows
from jaxllm.evaluation.runner import Generation, GenOptions, Rolled, Scored, TooLong
from jaxllm.generation import Sampler
from jaxllm.generation.batched import response_texts, sample_all
from jaxllm.generation.scoring import score_continuations
from jaxllm.interop import load_tokenizer
from jaxllm.sharding import make_mesh
from jaxllm.tokenizer.chat import ROLE_TOKENS
from jaxllm.trainers.checkpoint_model import load_checkpoint_model, quantize_state


class EvalModel:
    """A decoder and its tokenizer answering scoring and generation requests in batches."""

    def __init__(
        self, graphdef: nnx.GraphDef, state: nnx.State, tokenizer: Any, *, max_len: int,
        batch_size: int = 16, truncation: str = "left", mesh: Mesh | None = None,
        rules: str = "dp",
    ):  # fmt: skip
        self.graphdef, self.state, self.tok = graphdef, state, tokenizer
        self.max_len, self.batch_size, self.truncation = max_len, batch_size, truncation
        self.mesh, self.rules = mesh, rules
        self.sampler = Sampler(graphdef, mesh=mesh, rules=rules)
        self.bos = tokenizer.bos_id if tokenizer.bos_id >= 0 else tokenizer.eos_id

    @classmethod
    def load(
        cls, checkpoint: str | Path, *, tokenizer: str = "", mesh: MeshConfig | None = None,
        max_len: int = 0, batch_size: int = 16, truncation: str = "left",
        quantize: QuantizeConfig | None = None,
    ) -> EvalModel:  # fmt: skip
        """A checkpoint directory (jaxllm, LoRA, quantised or imported) loaded onto the
        mesh, its weights quantised by `quantize` when given."""
        mesh_cfg = mesh or MeshConfig()
        m = make_mesh(mesh_cfg)
        graphdef, state, model_cfg, meta = load_checkpoint_model(
            Path(checkpoint), m, mesh_cfg.rules
        )
        if quantize is not None:
            graphdef, state = quantize_state(graphdef, state, quantize, m, mesh_cfg.rules)
        tok_path = tokenizer or meta.get("tokenizer", "")
        if not tok_path:
            raise ConfigError(
                "config key 'inputs.tokenizer' is empty and the checkpoint names none"
            )
        limit = min(max_len or model_cfg.max_seq_len, model_cfg.max_seq_len)
        return cls(graphdef, state, load_tokenizer(tok_path), max_len=limit,
                   batch_size=batch_size, truncation=truncation, mesh=m, rules=mesh_cfg.rules)  # fmt: skip

    def encode_context(self, text: str) -> list[int]:
        ids = self.tok.encode(text)
        return ids if is_chat_text(text) or ids[:1] == [self.bos] else [self.bos, *ids]

    def encode_pair(self, context: str, cont: str) -> tuple[list[int], list[int]]:
        """lm-eval's split: trailing spaces join the continuation; the continuation's ids
        are those of the whole string after the context's."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, cont = context[:-n_spaces], context[-n_spaces:] + cont
        whole = self.encode_context(context + cont)
        ctx = self.encode_context(context)
        return ctx, whole[len(ctx) :]

    def fits(self, text: str, reserve: int) -> bool:
        """Whether a prompt and `reserve` more tokens fit the context."""
        return len(self.encode_context(text)) + reserve <= self.max_len

    def _fit(self, i: int, ctx: list[int], room: int) -> tuple[list[int], bool]:
        """The context cut to `room` tokens from the left, or `TooLong`."""
        if room < 1:
            raise TooLong(i, f"the answer does not fit the context of {self.max_len} tokens")
        if len(ctx) <= room:
            return ctx, False
        if self.truncation == "error":
            raise TooLong(i, f"the prompt has {len(ctx)} tokens, more than the {room} that fit "
                             f"(context {self.max_len}); shorten it or set eval.truncation: left")  # fmt: skip
        return ctx[-room:], True

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[Scored]:
        rows, cut = [], []
        for i, (context, cont) in enumerate(pairs):
            ctx, cont_ids = self.encode_pair(context, cont)
            if not cont_ids:
                raise TooLong(i, f"the continuation {cont!r} encodes to no tokens")
            ctx, was_cut = self._fit(i, ctx, self.max_len + 1 - len(cont_ids))
            rows.append((ctx, cont_ids))
            cut.append(was_cut)
        return [Scored(c.logprob, c.greedy, t) for c, t in zip(self._score(rows), cut)]

    def _score(self, rows):
        return score_continuations(self.graphdef, self.state, rows, batch_size=self.batch_size,
                                   max_len=self.max_len, mesh=self.mesh, rules=self.rules)  # fmt: skip

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[Rolled]:
        rows, owner = [], []
        for i, text in enumerate(texts):
            windows = rolling_windows(self.tok.encode(text), self.bos, self.max_len)
            rows += windows
            owner += [i] * len(windows)
        totals = [0.0] * len(texts)
        for i, c in zip(owner, self._score(rows)):
            totals[i] += c.logprob
        counts = [
            sum(len(cont) for o, (_, cont) in zip(owner, rows) if o == i) for i in range(len(texts))
        ]
        return [Rolled(t, n) for t, n in zip(totals, counts)]

    def generate(self, prompts: Sequence[str], opts: GenOptions) -> list[Generation]:
        room = self.max_len - opts.max_new_tokens + 1  # learned positions: prompt + new - 1
        fitted = [self._fit(i, self.encode_context(p), room) for i, p in enumerate(prompts)]
        encoded = (self.tok.encode(s) for s in opts.until)
        # the EOS, and a HF model's other generation_config.json end ids (as generate/serve)
        ends = set(getattr(self.tok, "eos_ids", [self.tok.eos_id]))
        stop_ids = sorted({ids[0] for ids in encoded if len(ids) == 1} | ends)
        key = jax.random.key(opts.seed)
        res = sample_all(
            self.sampler, self.state, [ids for ids, _ in fitted], batch_size=self.batch_size,
            key_for=lambda n: jax.random.fold_in(key, n), max_new_tokens=opts.max_new_tokens,
            temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p, stop_ids=stop_ids,
        )  # fmt: skip
        texts = [cut_at(t, opts.until) for t in response_texts(self.tok, res)]
        return [Generation(t, c) for t, (_, c) in zip(texts, fitted)]


def is_chat_text(text: str) -> bool:
    """Whether `text` is the chat template's rendering (`render_text`): `<s>` and a role token."""
    return text.startswith("<s>") and text[3:].startswith(tuple(ROLE_TOKENS.values()))


def cut_at(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    return text[: min((i for s in stops if s and (i := text.find(s)) >= 0), default=len(text))]
