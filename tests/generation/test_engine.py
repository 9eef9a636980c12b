"""The continuous-batching engine against the batch sampler: greedy slots give the sampler's
tokens whatever the mix of requests, slots are reused, seeds reproduce, cancels free slots."""

import threading

import jax
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.generation import Sampler
from jaxllm.generation.engine import Engine, QueueFull, Seq, run_until_done
from jaxllm.models import make_decoder

CFG = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=96)


def model(**kw):
    return nnx.split(make_decoder(ModelConfig(**{**CFG, **kw}), seed=1))


def prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 97, size=int(rng.integers(1, 16))).tolist() for _ in range(n)]


def collect(seq_args, engine):
    outs = [[] for _ in seq_args]
    seqs = [
        Seq(on_token=lambda t, o=o: o.append(t.id) or False, **a) for a, o in zip(seq_args, outs)
    ]
    return run_until_done(engine, seqs), outs


@pytest.mark.parametrize(
    "kw",
    [{}, pytest.param({"positions": "rope", "n_kv_heads": 2, "scan_layers": True},
                      marks=pytest.mark.slow)],
    ids=["learned", "rope_gqa_scan"],
)  # fmt: skip
def test_greedy_slots_equal_the_sampler(kw):
    graphdef, state = model(**kw)
    ps = prompts(11)
    lens = [
        3 + i % 5 * 4 for i in range(len(ps))
    ]  # different lengths: slots leave at different steps
    ref = Sampler(graphdef)(state, ps, max_new_tokens=max(lens), key=jax.random.key(0))
    engine = Engine(graphdef, state, slots=4, max_len=96, prefill_batch=2).start()
    try:
        reasons, outs = collect([dict(prompt=p, max_tokens=n) for p, n in zip(ps, lens)], engine)
    finally:
        engine.stop()
    assert reasons == ["length"] * len(ps)
    for out, row, n in zip(outs, ref.tokens, lens):
        assert out == row[:n]
    assert engine.stats["steps"] < sum(lens)  # slots decoded together


def test_stop_ids_seeds_and_queue():
    graphdef, state = model()
    ps = prompts(3, seed=1)
    engine = Engine(graphdef, state, slots=2, max_len=96, max_queue=4).start()
    try:
        greedy = collect([dict(prompt=ps[0], max_tokens=8)], engine)[1][0]
        k = max(greedy.index(t) for t in greedy)  # the last token seen first there
        stop = frozenset({greedy[k]})
        reasons, outs = collect([dict(prompt=ps[0], max_tokens=8, stop_ids=stop)], engine)
        assert reasons == ["stop"] and outs[0] == greedy[:k]
        sampled = [dict(prompt=ps[1], max_tokens=12, temperature=1.0, seed=s) for s in (5, 5, 6)]
        _, outs = collect(sampled, engine)
        assert outs[0] == outs[1] != outs[2]
        with pytest.raises(ValueError, match="served context"):
            engine.submit(Seq(prompt=[1] * 90, max_tokens=10))
    finally:
        engine.stop()
    # a full queue refuses (the engine is not started: nothing drains it)
    idle = Engine(graphdef, state, slots=1, max_len=96, max_queue=1)
    idle.submit(Seq(prompt=[1], max_tokens=1))
    with pytest.raises(QueueFull):
        idle.submit(Seq(prompt=[1], max_tokens=1))


def test_cancel_frees_the_slot():
    graphdef, state = model()
    engine = Engine(graphdef, state, slots=1, max_len=96).start()
    try:
        started = threading.Event()
        long = Seq(prompt=[5, 6], max_tokens=90, on_token=lambda t: started.set() or False)
        done = threading.Event()
        long.on_done = lambda r: done.set()
        engine.submit(long)
        assert started.wait(60)
        long.cancelled = True
        assert done.wait(60)
        reasons, outs = collect([dict(prompt=[7, 8], max_tokens=3)], engine)  # the slot is free
        assert reasons == ["length"] and len(outs[0]) == 3
    finally:
        engine.stop()


def test_a_failed_prefill_answers_its_requests(monkeypatch):
    """Sequences taken off the queue for a prefill that raises get `on_done("error")` (their
    clients are answered), and the engine goes on serving."""
    from jaxllm.generation import engine as engine_mod

    graphdef, state = model()
    real = engine_mod.programs.prefill
    calls = []

    def failing_once(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return real(*a, **kw)

    monkeypatch.setattr(engine_mod.programs, "prefill", failing_once)
    engine = Engine(graphdef, state, slots=2, max_len=96, prefill_batch=2)
    ended, both = [], threading.Semaphore(0)
    for p in ([5, 6], [7]):  # queued before the engine runs: one prefill of both
        engine.submit(Seq(prompt=p, max_tokens=3, on_token=lambda t: False,
                          on_done=lambda r: ended.append(r) or both.release()))  # fmt: skip
    engine.start()
    try:
        assert both.acquire(timeout=60) and both.acquire(timeout=60)
        assert ended == ["error", "error"] and engine.busy == 0
        reasons, outs = collect([dict(prompt=[7, 8], max_tokens=3)], engine)
        assert reasons == ["length"] and len(outs[0]) == 3
    finally:
        engine.stop()


def test_seeds_past_32_bits_draw_differently():
    from jaxllm.generation.slots import seed_key_data

    plain = np.asarray(jax.random.key_data(jax.random.key(7)), np.uint32)
    assert np.array_equal(seed_key_data(7), plain)  # the usual key below 2**32
    keys = [seed_key_data(s).tobytes() for s in (7, 7 + 2**32, 2**40, 0, 2**63 - 1)]
    assert len(set(keys)) == len(keys)  # no two of them alike
