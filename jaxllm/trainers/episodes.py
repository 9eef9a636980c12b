"""Multi-turn episodes with an environment (`grpo.env`): the model's turns and the
environment's observations alternate inside one assistant turn of the chat template.

All episodes of a batch advance turn by turn together: each turn re-prefills every live
episode (prompt + the turns so far) through the jitted KV-cache `Sampler` and samples up to
`max_new_tokens` stopping at the end-of-turn tokens (no per-token Python loop; the loop
here is over turns). A sampled turn that contains the environment's `stop` string
(`</tool>`) is cut right after the token that completes it (the tokens sampled after it are
dropped: they were never part of the episode) and its text up to the end of the first `stop`
goes to `env.step`; its observation is encoded and appended as environment tokens, and the
model continues in the next turn. A turn without it is the final answer. The completing
token may carry text past `stop` (a merged BPE piece such as `><` in `</tool><`): it stays in
the episode as the model's token, trained on with its sampler log-prob (a token cannot be
split, and dropping or re-encoding it would put text the model did not sample in its place),
and the environment reads the text only up to `stop`, as it reads nothing after a call. An
episode ends there, when the environment says done, after `max_turns` model turns, or when
the next turn (or an observation) would not fit in `seq_len` (truncated).

Layout: `rollout.py`'s rows ([B, seq_len], prompt + response) with `mask` 1 only where the
target is a model token (environment tokens are context, never trained on) and
`sampler_logp` the sampler's log-prob of each model token, conditioned on everything before
it (environment tokens included): exactly what the learner's single forward pass over the
row computes, so the sampler/learner agreement check holds across turns. `env_reward` [B]
is the sum of the environment's step rewards.

Multi-process: each process runs its own rows; every turn every process calls the sampler
with the same number of rows (the largest live count, padded to a power of two so that few
batch shapes compile). Only the unfinished episodes are sampled, so a row's place in a call
changes from turn to turn: each episode draws by its row's index in the global batch
(`Sampler`'s `row_ids`), so its tokens depend on the key, the turn and that index alone,
the same on any number of processes (and on a resume on another number).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxllm.generation import Sampler
from jaxllm.sharding.batch import process_max
from jaxllm.trainers.envs import Env
from jaxllm.trainers.rollout import Rollouts, rollout_arrays


@dataclass
class Episode:
    """One row's episode so far: the prompt and the response tokens after it (the model's
    and the environment's), which are the model's, the sampler's log-probs (0 for the
    environment's), and response positions left out of the text (the end-of-turn tokens)."""

    prompt: list[int]
    env: Env
    tokens: list[int] = field(default_factory=list)
    model: list[bool] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    hidden: set[int] = field(default_factory=set)
    reward: float = 0.0
    turns: int = 0
    done: bool = False

    @property
    def ids(self) -> list[int]:
        return self.prompt + self.tokens

    def add(self, ids: Sequence[int], logps: Sequence[float] | None = None) -> None:
        """Appends model tokens (with their log-probs) or environment tokens (without)."""
        self.tokens += list(ids)
        self.model += [logps is not None] * len(ids)
        self.logps += list(logps) if logps is not None else [0.0] * len(ids)

    def text(self, tok: Any) -> str:
        return tok.decode([t for j, t in enumerate(self.tokens) if j not in self.hidden])


def cut_at(tok: Any, ids: Sequence[int], stop: str) -> int | None:
    """How many of `ids` to keep: up to and including the token whose text completes the
    first `stop`; None when their text holds no `stop`."""
    if not stop or stop not in tok.decode(list(ids)):
        return None
    return next(k for k in range(1, len(ids) + 1) if stop in tok.decode(list(ids[:k])))


def action_text(tok: Any, ids: Sequence[int], stop: str) -> str:
    """The text of a turn's kept `ids` as the environment reads it: up to the end of the first
    `stop` (the token that completes it may carry more text, e.g. `><`), else all of it."""
    text = tok.decode(list(ids))
    at = text.find(stop) if stop else -1
    return text if at < 0 else text[: at + len(stop)]


def model_turn(ep: Episode, ids: list[int], logps: list[float], stopped: bool, tok: Any,
               seq_len: int) -> None:  # fmt: skip
    """One sampled turn into the episode: cut after the token that completes the
    environment's stop string, the turn's text up to that string to `env.step` (the module
    docstring), its observation appended as environment tokens."""
    cut = cut_at(tok, ids, ep.env.stop)
    if cut is not None:
        ids, logps, stopped = ids[:cut], logps[:cut], False
    ep.add(ids, logps)
    if stopped:  # the end-of-turn token is learnt but is not text
        ep.hidden.add(len(ep.tokens) - 1)
    ep.turns += 1
    obs, reward, done = ep.env.step(action_text(tok, ids[:-1] if stopped else ids, ep.env.stop))
    ep.reward += float(reward)
    obs_ids = tok.encode(obs) if obs else []
    if len(ep.ids) + len(obs_ids) > seq_len:
        ep.done = True  # truncated: no room for the observation
        return
    ep.add(obs_ids)
    ep.done = done or cut is None


def run_episodes(
    sampler: Sampler, weights: nnx.State, rows: Sequence[dict], envs: Sequence[Env], tok: Any,
    *, seq_len: int, max_new_tokens: int, max_turns: int, key: jax.Array, temperature: float,
    stop_ids: Sequence[int], first_row: int = 0,
) -> Rollouts:  # fmt: skip
    """This process's prompt rows (`ids`) played out against one fresh env each, all
    episodes advancing together one model turn per sampler call; turn t samples with key
    `fold_in(key, t)` and row id `first_row + i` for `rows[i]` (its index in the global
    batch). Returns the rows laid out for the learner (the module docstring)."""
    eps = [Episode(list(r["ids"]), env) for r, env in zip(rows, envs, strict=True)]
    for ep, row in zip(eps, rows):
        first = ep.env.reset(row)
        ep.add(tok.encode(first) if first else [])
    for turn in range(max_turns):
        for ep in eps:
            ep.done = ep.done or len(ep.ids) + max_new_tokens > seq_len  # no room: truncated
        live = [i for i, ep in enumerate(eps) if not ep.done]
        n = process_max(len(live))
        if n == 0:
            break
        size = min(1 << (n - 1).bit_length(), len(eps))
        calls = live or [0]  # a process with none still calls
        calls = calls + [calls[-1]] * (size - len(calls))  # copies: their draws are dropped
        res = sampler(
            weights, [eps[i].ids for i in calls], max_new_tokens=max_new_tokens,
            key=jax.random.fold_in(key, turn), temperature=temperature, stop_ids=stop_ids,
            row_ids=[first_row + i for i in calls],
        )  # fmt: skip
        for i, ids, logps, stopped in zip(live, res.tokens, res.logprobs, res.stopped):
            model_turn(eps[i], ids, logps, stopped, tok, seq_len)
    return layout_episodes(eps, tok, seq_len)


def layout_episodes(eps: Sequence[Episode], tok: Any, seq_len: int) -> Rollouts:
    """Episodes as `rollout.py`'s [B, seq_len] rows (mask and sampler log-probs on the
    model's tokens only), their texts and the environment rewards."""
    b = len(eps)
    tokens, seg = np.zeros((b, seq_len), np.int32), np.zeros((b, seq_len), np.int32)
    mask, slogp = np.zeros((b, seq_len), np.float32), np.zeros((b, seq_len), np.float32)
    for i, ep in enumerate(eps):
        ids = ep.ids
        tokens[i, : len(ids)], seg[i, : len(ids)] = ids, 1
        at = len(ep.prompt) - 1 + np.flatnonzero(ep.model)  # where each model token is a target
        mask[i, at] = 1.0
        slogp[i, at] = np.asarray(ep.logps, np.float32)[np.asarray(ep.model, bool)]
    batch = rollout_arrays(tokens, seg, mask, slogp)
    batch["env_reward"] = np.array([ep.reward for ep in eps], np.float32)
    lengths = np.array([len(ep.tokens) for ep in eps], np.int32)
    return Rollouts(batch, [ep.text(tok) for ep in eps], lengths)


@dataclass(frozen=True)
class EpisodeRunner:
    """A stage's episodes: `runner(weights, rows, max_new_tokens=, key=, temperature=,
    first_row=)` plays each row against a fresh `make_env()` (see `run_episodes`)."""

    sampler: Sampler
    tok: Any
    make_env: Callable[[], Env]
    stop_ids: tuple[int, ...]
    seq_len: int
    max_turns: int

    def __call__(self, weights: nnx.State, rows: Sequence[dict], *, max_new_tokens: int,
                 key: jax.Array, temperature: float, first_row: int = 0) -> Rollouts:  # fmt: skip
        return run_episodes(
            self.sampler, weights, rows, [self.make_env() for _ in rows], self.tok,
            seq_len=self.seq_len, max_new_tokens=max_new_tokens, max_turns=self.max_turns,
            key=key, temperature=temperature, stop_ids=self.stop_ids, first_row=first_row,
        )  # fmt: skip
