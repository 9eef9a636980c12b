"""Batched generation with a KV cache: one jitted prefill, then the whole decode loop inside
one compiled `lax.while_loop` (no per-token Python dispatch).

Weights are an argument of every call (`state` from `nnx.split`), never baked in, so RL can
pass fresh params each iteration without recompiling. Programs are compiled once per
(graphdef, batch size, prompt bucket, generation bucket, greedy or not, filtered or not);
temperature, top-k, top-p, stop ids and `max_new_tokens` are runtime values.

Prompts are LEFT-padded to a bucket (next power of two, >= 16): every row's last prompt token
sits in the same slot, so prefill reads one logits column and each decode step writes one
cache slot for all rows (a scalar `dynamic_update_slice`, no per-row scatter). Padding slots
get segment id 0 and are never attended; positions count real tokens only, so a row's
output does not depend on how much padding it got.

Each generated token comes with its log-prob under the distribution it was drawn from:
`log_softmax(logits / temperature)` before top-k / top-p (temperature 1: the raw model's;
greedy, temperature 0: the raw model's too). RL learners divide their logits by the same
temperature, so sampler and learner log-probs of a rollout agree.

On a mesh (`Sampler(graphdef, mesh=..., rules=...)`) the batch is split over the rule
table's `act_batch` axes: each process passes its own rows of the global batch, prompts and
the KV cache are sharded by row, the rules apply inside prefill and decode (weights stay
where the train state put them), and the outputs come back row-sharded. Random draws do not
depend on the layout (partitionable threefry), so a row gets the same tokens on one device
or many.

Step t of a call draws the whole batch with `fold_in(key, t)`, so a row's draw depends on
its index in the batch. With `row_ids` (an int per row) row b draws alone with
`fold_in(fold_in(key, row_ids[b]), t)` instead: its tokens depend only on the key, its id and
its own logits, not on which rows share the call or where it sits (multi-turn episodes, which
re-batch their unfinished rows every turn, use it; `episodes.py`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxllm.errors import PromptError
from jaxllm.generation.sampling import sample_logits, token_logprobs
from jaxllm.sharding import constrain, use_rules
from jaxllm.sharding.batch import (
    batch_shards,
    local_rows,
    pad_rows,
    process_max,
    process_rows,
    rows_multiple,
    rows_to_global,
)


@dataclass(frozen=True)
class SampleResult:
    """Per row: generated ids (the stop token included when one was hit), their log-probs
    `log_softmax(logits / temperature)[id]` (the sampling distribution before top-k/top-p:
    the policy log-prob RL needs; greedy decoding reports temperature-1 log-probs), the
    number of generated tokens and whether a stop token ended the row."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    num_tokens: list[int]
    stopped: list[bool]


class Generated(NamedTuple):
    """A sampler call's outputs as (global, row-sharded) arrays: tokens and log-probs
    [B, G] (zero past each row's end), generated-token counts [B] and stop flags [B]."""

    tokens_BG: jax.Array
    logprobs_BG: jax.Array
    num_tokens_B: jax.Array
    stopped_B: jax.Array


class Layout(NamedTuple):
    """Where a sampler's programs put rows: a mesh and a rule table's name (static)."""

    mesh: Mesh
    rules: str


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def prompt_bucket(n: int, minimum: int = 16) -> int:
    """Padded prompt length: the next power of two (at least `minimum`)."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def pad_prompts(prompts: Sequence[Sequence[int]], length: int) -> tuple[np.ndarray, ...]:
    """Left-pads to `length`: (tokens, segment_ids, positions) [B, length] int32, lengths [B]."""
    lens = np.array([len(p) for p in prompts], np.int32)
    if lens.min(initial=1) < 1 or lens.max(initial=0) > length:
        raise ValueError(f"prompts must have 1..{length} tokens, got lengths {lens.tolist()}")
    slots = np.arange(length, dtype=np.int32)[None, :]
    start = (length - lens)[:, None]
    tokens = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, length - len(p) :] = p
    seg = (slots >= start).astype(np.int32)
    pos = np.maximum(slots - start, 0).astype(np.int32)
    return tokens, seg, pos, lens


class Mode(NamedTuple):
    """The compile-time part of the sampling settings: which code paths exist."""

    greedy: bool  # temperature == 0: argmax only
    filtered: bool  # top_k > 0 or top_p < 1: one sort per step


def _sample(logits_BV: jax.Array, key: jax.Array, knobs: tuple, mode: Mode) -> jax.Array:
    """One draw for the whole batch with `key`."""
    if mode.greedy:
        return sample_logits(logits_BV, key, temperature=0.0)
    temperature, top_k, top_p = knobs
    if not mode.filtered:
        return sample_logits(logits_BV, key, temperature=temperature)
    return sample_logits(logits_BV, key, temperature=temperature, top_k=top_k, top_p=top_p)


def _draw(logits_BV, key, t, rows_B, knobs: tuple, mode: Mode) -> jax.Array:
    """Step `t`'s tokens [B]: one draw with `fold_in(key, t)` (`rows_B` None), else row b
    draws alone with `fold_in(fold_in(key, rows_B[b]), t)` (the module docstring)."""
    if rows_B is None or mode.greedy:
        return _sample(logits_BV, jax.random.fold_in(key, t), knobs, mode)

    def one(logits_V, row):
        row_key = jax.random.fold_in(jax.random.fold_in(key, row), t)
        return _sample(logits_V[None], row_key, knobs, mode)[0]

    return jax.vmap(one)(logits_BV, rows_B)


def _logprobs(logits_BV: jax.Array, tok_B: jax.Array, knobs: tuple, mode: Mode) -> jax.Array:
    """Log-probs of the drawn tokens under the tempered distribution they were drawn from
    (before top-k / top-p); greedy rows have none, so they get the raw (temperature 1) ones."""
    return token_logprobs(logits_BV, tok_B, 1.0 if mode.greedy else knobs[0])


@contextlib.contextmanager
def _rules(layout: Layout | None) -> Iterator[None]:
    """The layout's logical-axis rules while tracing (nothing without a layout)."""
    if layout is None:
        yield
        return
    with use_rules(layout.mesh, layout.rules):
        yield


def _rows(x: jax.Array) -> jax.Array:
    """`x` split by row over the batch axes (under the active rules)."""
    return constrain(x, ("act_batch",) + (None,) * (x.ndim - 1))


def _cache_rows(cache):
    """Every cache array split by row: k / v [..., B, K, S, H] also by kv head where the
    rules split heads; the slot segment ids [B, S] by row; the write index replicated."""

    def place(path, x):
        if getattr(path[0], "name", None) in ("k", "v"):
            return constrain(x, (None,) * (x.ndim - 4) + ("act_batch", "act_heads", None, None))
        return _rows(x) if x.ndim else x

    return jax.tree_util.tree_map_with_path(place, cache)


@functools.partial(jax.jit, static_argnames=("graphdef", "mode", "cache_size", "layout"))
def _prefill(graphdef, state, prompt, key_data, knobs, rows_B=None, *, mode: Mode,
             cache_size: int, layout):  # fmt: skip
    """Runs the padded prompts (tokens, segment ids, positions) into a fresh cache; returns
    (cache, first token [B], its log-prob [B]), all split by row. `rows_B`: `_draw`'s."""
    tokens_BP, seg_BP, pos_BP = prompt
    key = jax.random.wrap_key_data(key_data)
    with _rules(layout):
        model = nnx.merge(graphdef, state)
        cache = _cache_rows(model.init_cache(tokens_BP.shape[0], cache_size))
        logits_B1V, cache = model.extend(
            tokens_BP, cache, positions_BL=pos_BP, segment_ids_BL=seg_BP, last_only=True
        )
        tok_B = _draw(logits_B1V[:, 0], key, 0, rows_B, knobs, mode)
        logp_B = _logprobs(logits_B1V[:, 0], tok_B, knobs, mode)
        return _cache_rows(cache), _rows(tok_B), _rows(logp_B)


def _decode_init(cache, tok_B, logp_B, pos_B, stop_B, max_new, out_len: int) -> dict:
    b = tok_B.shape[0]
    return dict(
        cache=cache,
        t=jnp.ones((), jnp.int32),
        tok=tok_B,
        pos=pos_B,
        done=stop_B | (max_new <= 1),
        stopped=stop_B,
        n=jnp.ones_like(tok_B),
        out=_rows(jnp.zeros((b, out_len), jnp.int32).at[:, 0].set(tok_B)),
        out_logp=_rows(jnp.zeros((b, out_len), jnp.float32).at[:, 0].set(logp_B)),
    )


@functools.partial(
    jax.jit, static_argnames=("graphdef", "mode", "out_len", "layout"), donate_argnames=("cache",)
)
def _decode(graphdef, state, cache, first, key_data, knobs, stop_T, max_new, rows_B=None, *,
            mode, out_len, layout):  # fmt: skip
    """The decode loop, one `lax.while_loop`: feeds each row's last token at the next cache
    slot and samples the next, until every row hit a stop id or `max_new` tokens. `first` is
    (token, log-prob, position) of the first generated token of each row. The cache is
    donated; every output is split by row. `rows_B`: `_draw`'s."""
    key = jax.random.wrap_key_data(key_data)
    with _rules(layout):
        model = nnx.merge(graphdef, state)
        tok_B, logp_B, pos_B = first

        def is_stop(t_B):
            return jnp.any(t_B[:, None] == stop_T[None, :], axis=-1)

        def cond(c):
            return (c["t"] < max_new) & ~jnp.all(c["done"])

        def body(c):
            tok_B1, pos_B1 = c["tok"][:, None], c["pos"][:, None]
            logits_B1V, cache = model.extend(tok_B1, c["cache"], positions_BL=pos_B1)
            live_B = ~c["done"]
            new_B = jnp.where(live_B, _draw(logits_B1V[:, 0], key, c["t"], rows_B, knobs, mode), 0)
            logp_B = jnp.where(live_B, _logprobs(logits_B1V[:, 0], new_B, knobs, mode), 0.0)
            stop_B = live_B & is_stop(new_B)
            return dict(
                cache=_cache_rows(cache),
                t=c["t"] + 1,
                tok=new_B,
                pos=c["pos"] + 1,
                done=c["done"] | stop_B | (c["t"] + 1 >= max_new),
                stopped=c["stopped"] | stop_B,
                n=c["n"] + live_B.astype(jnp.int32),
                out=c["out"].at[:, c["t"]].set(new_B),
                out_logp=c["out_logp"].at[:, c["t"]].set(logp_B),
            )

        init = _decode_init(cache, tok_B, logp_B, pos_B, is_stop(tok_B), max_new, out_len)
        c = jax.lax.while_loop(cond, body, init)
        out = (c["out"], c["out_logp"], c["n"], c["stopped"])
        return Generated(*(_rows(x) for x in out)), _cache_rows(c["cache"])


class Sampler:
    """Generation for one model architecture (`graphdef`); weights come with each call.
    With a `mesh`, rows are split over the batch axes of `rules` and each process passes
    (and gets back) its own rows; without one, everything runs where the weights are."""

    def __init__(
        self, graphdef: nnx.GraphDef, *, mesh: Mesh | None = None, rules: str = "dp",
        gen_multiple: int = 64, min_prompt: int = 16,
    ):  # fmt: skip
        self.graphdef = graphdef
        self.layout = None if mesh is None else Layout(mesh, rules)
        self.gen_multiple = gen_multiple
        self.min_prompt = min_prompt
        self._cfg = None  # the model config, read from the first state merged

    @property
    def shards(self) -> int:
        """How many pieces a batch is split into (a global batch is a multiple of it)."""
        return 1 if self.layout is None else batch_shards(*self.layout)

    def my_rows(self, n: int) -> slice:
        """This process's rows of an `n`-row global batch (a multiple of `shards`)."""
        return slice(0, n) if self.layout is None else process_rows(*self.layout, n)

    def __call__(
        self, state: nnx.State, prompts: Sequence[Sequence[int]], *,
        row_ids: Sequence[int] | None = None, **kw,
    ) -> SampleResult:  # fmt: skip
        """Generates for this process's `prompts` (token-id lists of any lengths; any
        number: padded with copies to split over the mesh). Keywords as `generate`."""
        if not prompts:
            raise ValueError("Sampler: no prompts given")
        multiple = 1 if self.layout is None else rows_multiple(*self.layout)
        padded, n = pad_rows(np.arange(len(prompts)), multiple)
        if row_ids is not None:
            if len(row_ids) != n:
                raise ValueError(f"Sampler: {len(row_ids)} row_ids for {n} prompts")
            kw["row_ids"] = np.asarray(row_ids)[padded]
        out = self.generate(state, [prompts[i] for i in padded], **kw)
        return to_result(*(local_rows(x)[:n] for x in out))

    def generate(
        self,
        state: nnx.State,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        key: jax.Array,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop_ids: Sequence[int] = (),
        row_ids: Sequence[int] | None = None,
    ) -> Generated:
        """Up to `max_new_tokens` for each of this process's `prompts` (on a mesh their
        number times the processes must be a multiple of `shards`), as global arrays.
        `row_ids` (one int >= 0 per prompt): each row draws by its id, not its index (the
        module docstring); None: the whole batch draws with one key per step."""
        if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError("need max_new_tokens >= 1, temperature >= 0, 0 < top_p <= 1")
        if not prompts:
            raise ValueError("Sampler: no prompts given")
        rows = None if row_ids is None else np.asarray(row_ids, np.int32)
        if rows is not None and (rows.shape != (len(prompts),) or rows.min() < 0):
            raise ValueError(
                f"Sampler: row_ids must be {len(prompts)} ints >= 0 (one per prompt), got "
                f"{np.asarray(row_ids).tolist()}"
            )
        longest = process_max(max(len(p) for p in prompts))  # one bucket on every process
        tokens, seg, pos, lens = pad_prompts(prompts, prompt_bucket(longest, self.min_prompt))
        self._validate(state, tokens, longest, max_new_tokens)
        if self.layout is not None:
            tokens, seg, pos, lens, rows = rows_to_global(
                (tokens, seg, pos, lens, rows), *self.layout
            )
        gen_len = _round_up(max_new_tokens, self.gen_multiple)
        mode = Mode(greedy=temperature == 0, filtered=top_k > 0 or top_p < 1.0)
        knobs = (np.float32(temperature), np.int32(top_k), np.float32(top_p))
        key_data = _key_data(key)
        cache, tok, logp = _prefill(
            self.graphdef, state, (tokens, seg, pos), key_data, knobs, rows, mode=mode,
            cache_size=tokens.shape[1] + gen_len, layout=self.layout,
        )  # fmt: skip
        out, _ = _decode(
            self.graphdef, state, cache, (tok, logp, lens), key_data, knobs,
            _stop_array(stop_ids), np.int32(max_new_tokens), rows, mode=mode, out_len=gen_len,
            layout=self.layout,
        )  # fmt: skip
        return out

    def _validate(self, state, tokens: np.ndarray, longest: int, max_new_tokens: int) -> None:
        """Errors before compiling: ids outside the vocabulary, positions past the table."""
        if self._cfg is None:
            self._cfg = nnx.merge(self.graphdef, state).cfg
        cfg = self._cfg
        if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
            raise PromptError(
                f"prompt token ids must be in [0, {cfg.vocab_size}) (the model's vocab_size), "
                f"got {tokens.min()}..{tokens.max()}: tokenizer and model do not match?"
            )
        if cfg.positions == "learned" and longest + max_new_tokens - 1 > cfg.max_seq_len:
            raise PromptError(
                f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the "
                f"model's max_seq_len {cfg.max_seq_len} (learned positions): shorten the "
                "prompt or lower max_new_tokens (e.g. generate.max_new_tokens)"
            )


def _key_data(key: jax.Array) -> np.ndarray:
    """A key's raw bits on the host (a typed key or a legacy uint32 one): every process
    passes the same small array, which the programs wrap back into a key."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(key)


def _stop_array(stop_ids: Sequence[int]) -> np.ndarray:
    """Stop ids padded with -1 to a multiple of 8, so changing them does not recompile."""
    ids = list(stop_ids)
    return np.asarray(ids + [-1] * (_round_up(max(len(ids), 1), 8) - len(ids)), np.int32)


def to_result(out, out_logp, n, stopped) -> SampleResult:
    """Host arrays of generated rows → per-row lists (each cut at its token count)."""
    rows = range(out.shape[0])
    return SampleResult(
        tokens=[out[i, : n[i]].tolist() for i in rows],
        logprobs=[out_logp[i, : n[i]].tolist() for i in rows],
        num_tokens=[int(x) for x in n],
        stopped=[bool(x) for x in stopped],
    )
