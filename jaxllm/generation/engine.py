"""Continuous batching: requests join free decode slots between steps and leave when done.

One background thread owns the device. Each turn it (1) frees the slots of cancelled
sequences, (2) admits waiting sequences into free slots — their prompts prefilled in groups
of one length bucket (`slots.prefill`, 1 or `prefill_batch` rows a call) and copied into
the slots — and (3) runs ONE decode step for every slot (`slots.decode_step`, one
compiled program whatever the mix of requests), reading its tokens back in one host sync.
A long request never holds a short one back: a finished sequence's slot is refilled at the
next turn.

Sequences talk back through callbacks run on the engine thread: `on_token` (returns True to
stop early, e.g. at a stop string) and `on_done(reason)` with "stop" (a stop id or
`on_token`'s say-so), "length" (`max_tokens`), "cancelled" or "error". The weights are an
argument (`set_weights`), never baked in: an RL loop can reuse the engine with fresh ones.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx

from jaxllm.generation import slots as programs

log = logging.getLogger(__name__)


class Token(NamedTuple):
    id: int
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


class QueueFull(Exception):
    """The engine's waiting line is full: try again later."""


@dataclass(eq=False)
class Seq:
    """One sequence to generate: the prompt's ids and its sampling settings."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    choice: int = 0  # which of a request's draws: 0 the seed's own key, k > 0 one derived
    stop_ids: frozenset[int] = frozenset()
    on_token: Callable[[Token], bool] = lambda t: False
    on_done: Callable[[str], None] = lambda reason: None
    cancelled: bool = False  # set from any thread; the engine frees the slot next turn
    generated: int = 0
    key_data: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class Engine:
    """`slots` decode slots over one KV cache of `max_len` positions per slot."""

    def __init__(
        self, graphdef: nnx.GraphDef, state: nnx.State, *, slots: int = 8, max_len: int,
        prefill_batch: int = 4, max_queue: int = 64, min_bucket: int = 16, top_n: int = 5,
    ):  # fmt: skip
        self.graphdef, self.state = graphdef, state
        self.n_slots, self.max_len, self.top_n = slots, max_len, top_n
        self.prefill_batch, self.max_queue, self.min_bucket = prefill_batch, max_queue, min_bucket
        self.cache = programs.empty_cache(graphdef, state, slots, max_len)
        self.rows: list[Seq | None] = [None] * slots
        self.tok = np.zeros(slots, np.int32)
        self.pos = np.zeros(slots, np.int32)
        self.temp = np.zeros(slots, np.float32)
        self.top_p = np.ones(slots, np.float32)
        self.keys = np.zeros((slots, 2), np.uint32)
        self.drawn = np.zeros(slots, np.int32)
        self.pending: deque[Seq] = deque()
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.running = False
        self.stats = {"steps": 0, "tokens": 0, "prefills": 0, "busy_slot_steps": 0}

    # ------------------------------------------------------------------ public, any thread

    def submit(self, seq: Seq) -> None:
        """Queues `seq`; `QueueFull` when `max_queue` are waiting, `ValueError` when it can
        never fit a slot (prompt + max_tokens > max_len) or has no prompt."""
        if not seq.prompt or len(seq.prompt) + seq.max_tokens > self.max_len:
            raise ValueError(
                f"prompt of {len(seq.prompt)} tokens + max_tokens {seq.max_tokens} must be "
                f"1..{self.max_len} tokens (the served context)"
            )
        seq.key_data = programs.choice_key_data(seq.seed, seq.choice)
        with self.cond:
            if len(self.pending) >= self.max_queue:
                raise QueueFull(f"{len(self.pending)} requests already waiting")
            self.pending.append(seq)
            self.cond.notify()

    def set_weights(self, state: nnx.State) -> None:
        """New weights from the next step on (same structure: nothing recompiles)."""
        with self.cond:
            self.state = state

    def start(self) -> Engine:
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="jaxllm-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.running = False
            self.cond.notify()
        if self.thread is not None:
            self.thread.join()
        for seq in [*self.pending, *(s for s in self.rows if s is not None)]:
            seq.on_done("cancelled")

    @property
    def busy(self) -> int:
        return sum(s is not None for s in self.rows)

    @property
    def waiting(self) -> int:
        return len(self.pending)

    # ------------------------------------------------------------------ the engine thread

    def _loop(self) -> None:
        while True:
            with self.cond:
                while self.running and not self.pending and not self.busy:
                    self.cond.wait(timeout=0.5)
                if not self.running:
                    return
            try:
                self._free_cancelled()
                self._admit()
                if self.busy:
                    self._step()
            except Exception:  # a failed program must not take the server down
                log.exception("engine step failed; failing the running requests")
                for b, seq in enumerate(self.rows):
                    if seq is not None:
                        self._finish(b, "error")
                self.cache = programs.empty_cache(self.graphdef, self.state, self.n_slots,
                                                  self.max_len)  # fmt: skip

    def _free_cancelled(self) -> None:
        for b, seq in enumerate(self.rows):
            if seq is not None and seq.cancelled:
                self._finish(b, "cancelled")

    def _take_pending(self, n: int) -> list[Seq]:
        taken: list[Seq] = []
        with self.cond:
            while self.pending and len(taken) < n:
                seq = self.pending.popleft()
                if seq.cancelled:
                    seq.on_done("cancelled")
                else:
                    taken.append(seq)
        return taken

    def _bucket(self, n: int) -> int:
        return min(self.max_len, max(self.min_bucket, _pow2_at_least(n)))

    def _admit(self) -> None:
        """Fills free slots from the queue: prefill grouped by length bucket, then insert."""
        free = [b for b, s in enumerate(self.rows) if s is None]
        seqs = self._take_pending(len(free))
        groups: dict[int, list[Seq]] = {}
        for seq in seqs:
            groups.setdefault(self._bucket(len(seq.prompt)), []).append(seq)
        left = seqs  # taken off the queue, not yet in a slot: a failed prefill answers them
        try:
            for bucket, group in sorted(groups.items()):
                for start in range(0, len(group), self.prefill_batch):
                    chunk = group[start : start + self.prefill_batch]
                    self._prefill(bucket, chunk, [free.pop(0) for _ in chunk])
                    left = [s for s in left if all(s is not c for c in chunk)]
        except Exception:
            in_slots = {id(s) for s in self.rows if s is not None}
            for seq in left:
                if id(seq) not in in_slots:
                    seq.on_done("error")
            raise

    def _prefill(self, bucket: int, chunk: list[Seq], slots: list[int]) -> None:
        r = 1 if len(chunk) == 1 else self.prefill_batch  # two programs per bucket
        rows = chunk + [chunk[0]] * (r - len(chunk))
        tokens = np.zeros((r, bucket), np.int32)
        for i, seq in enumerate(rows):
            tokens[i, : len(seq.prompt)] = seq.prompt
        lens = np.array([len(s.prompt) for s in rows], np.int32)
        params = programs.RowParams(
            np.array([s.temperature for s in rows], np.float32),
            np.array([s.top_p for s in rows], np.float32),
            np.stack([s.key_data for s in rows]),
            np.zeros(r, np.int32),
        )
        slot_ids = np.array(slots + [self.n_slots] * (r - len(chunk)), np.int32)
        self.cache, picked = programs.prefill(
            self.graphdef, self.state, self.cache, tokens, lens, slot_ids, params, top_n=self.top_n
        )
        picked = jax.device_get(picked)
        self.stats["prefills"] += 1
        for i, (seq, b) in enumerate(zip(chunk, slots)):
            self.rows[b] = seq
            self.pos[b], self.drawn[b] = len(seq.prompt), 1
            self.temp[b], self.top_p[b], self.keys[b] = seq.temperature, seq.top_p, seq.key_data
            self._emit(b, picked, i)

    def _step(self) -> None:
        live = np.array([s is not None for s in self.rows])
        params = programs.RowParams(self.temp, self.top_p, self.keys, self.drawn)
        with self.cond:
            state = self.state
        self.cache, picked = programs.decode_step(
            self.graphdef, state, self.cache, self.tok, self.pos, live, params, top_n=self.top_n
        )
        picked = jax.device_get(picked)  # the step's one host sync
        self.stats["steps"] += 1
        self.stats["busy_slot_steps"] += int(live.sum())
        for b in np.flatnonzero(live):
            self.pos[b] += 1
            self.drawn[b] += 1
            self._emit(b, picked, b)

    def _emit(self, b: int, picked: programs.Picked, i: int) -> None:
        """Hands row `i` of `picked` to slot `b`'s sequence; frees the slot when it ends."""
        seq = self.rows[b]
        assert seq is not None
        tok = int(picked.token[i])
        self.tok[b] = tok
        self.stats["tokens"] += 1
        if seq.cancelled:
            return self._finish(b, "cancelled")
        if tok in seq.stop_ids:
            return self._finish(b, "stop")
        seq.generated += 1
        token = Token(tok, float(picked.logprob[i]), picked.top_ids[i].tolist(),
                      picked.top_logprobs[i].tolist())  # fmt: skip
        try:
            stop = seq.on_token(token)
        except Exception:
            log.exception("on_token failed")
            return self._finish(b, "error")
        if stop:
            self._finish(b, "stop")
        elif seq.generated >= seq.max_tokens:
            self._finish(b, "length")

    def _finish(self, b: int, reason: str) -> None:
        seq, self.rows[b] = self.rows[b], None
        if seq is not None:
            seq.on_done(reason)


def run_until_done(engine: Engine, seqs: list[Seq], timeout: float = 600.0) -> list[str]:
    """Submits `seqs` to a started engine and waits for all; returns their end reasons."""
    done = threading.Semaphore(0)
    reasons: dict[int, str] = {}
    for i, seq in enumerate(seqs):
        inner = seq.on_done

        def on_done(reason: str, i=i, inner=inner) -> None:
            reasons[i] = reason
            inner(reason)
            done.release()

        seq.on_done = on_done
        engine.submit(seq)
    deadline = time.monotonic() + timeout
    for _ in seqs:
        if not done.acquire(timeout=max(deadline - time.monotonic(), 0)):
            raise TimeoutError("engine: sequences not finished in time")
    return [reasons[i] for i in range(len(seqs))]
