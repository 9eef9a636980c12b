"""Asynchronous rollouts (`grpo.max_staleness: k`): the schedule of sampling weights against a
hand-written table, the host draws against the synchronous order, errors and a stuck producer
surfacing in the learner's thread, and the stage end to end on the tiny model (the weights
each rollout was sampled with, determinism, resume equality, an error in the producer)."""

import json
import os
import shutil
import signal
import threading

import jax
import numpy as np
import pytest

from jaxllm.config import replace
from jaxllm.errors import ConfigError
from jaxllm.rundir import RunDir
from jaxllm.trainers import grpo, ppo, rl_async, rl_iteration
from jaxllm.trainers.rl_async import RolloutPipeline, RolloutTimeout, staleness
from jaxllm.training.preemption import Preempted

from .conftest import rl_config

SMALL = dict(max_new_tokens=6, eval_examples=0, prompts_per_iteration=2, group_size=4,
             minibatch_size=8, epochs=1, beta=0.05, tis_cap=2.0)  # fmt: skip


def within(seconds: float, fn, *args):
    """fn(*args) in a thread; fails (instead of hanging) if it takes longer than `seconds`.
    Returns fn's result or the exception it raised."""
    out = {}

    def target():
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - returned to the test
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s: a hang"
    return out.get("error", out.get("value"))


def drive(k: int, every: int, last: int, produce=None, seed: int = 0):
    """The learner's side of the pipeline with fake parts: the 'state' is the number of
    iterations trained, `prepare` draws from a seeded generator. Returns per iteration
    (weights version, staleness, plan)."""
    rng = np.random.default_rng(seed)
    seen = []

    def make(it, weights, plan, stale):
        return weights

    pipe = RolloutPipeline(
        k, every, last, prepare=lambda it, r: (it, r.integers(1 << 30)), produce=produce or make,
        snapshot=lambda state: state,
    )  # fmt: skip
    try:
        for it in range(1, last + 1):
            plan, version, stale = pipe.take(it, it - 1, rng)
            seen.append((version, stale, plan))
            pipe.advance(it, it, rng)
    finally:
        pipe.close()
    return seen


@pytest.mark.parametrize(
    "k, every, last, versions",
    [  # the weights (iterations trained) each iteration's rollouts are sampled with
        (1, 0, 5, [0, 0, 1, 2, 3]),
        (2, 0, 5, [0, 0, 0, 1, 2]),
        (2, 3, 7, [0, 0, 0, 3, 3, 3, 6]),  # segments end at the resume checkpoints 3, 6
        (1, 2, 5, [0, 0, 2, 2, 4]),
        (3, 0, 2, [0, 0]),
    ],
)
def test_schedule_of_sampling_weights(k, every, last, versions):
    seen = drive(k, every, last)
    assert [v for v, _, _ in seen] == versions
    want = [it - 1 - v for it, v in enumerate(versions, 1)]
    assert [s for _, s, _ in seen] == want == [staleness(i, k, every) for i in range(1, last + 1)]
    # the host draws are the synchronous loop's: one per iteration, in iteration order
    rng = np.random.default_rng(0)
    assert [p for _, _, p in seen] == [(i, rng.integers(1 << 30)) for i in range(1, last + 1)]


def test_producer_error_surfaces_in_the_learner():
    def make(it, weights, plan, stale):
        if it == 3:
            raise ValueError("reward failed on iteration 3")
        return weights

    err = within(10, drive, 1, 0, 5, make)
    assert isinstance(err, ValueError) and "iteration 3" in str(err)


def test_stuck_producer_times_out(monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(rl_async, "WAIT_TIMEOUT_S", 0.2)

    def make(it, weights, plan, stale):
        if it == 2:
            release.wait(30)
        return weights

    err = within(10, drive, 1, 0, 3, make)
    release.set()
    assert isinstance(err, RolloutTimeout) and "iteration 2" in str(err)


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_bad_staleness_is_one_line(tmp_path, stage):
    with pytest.raises(ConfigError, match=rf"'{stage}.max_staleness': must be >= 0"):
        rl_config(stage, tmp_path, tmp_path, max_staleness=-1, tis_cap=2.0)
    with pytest.raises(ConfigError, match=rf"'{stage}.max_staleness'.*set tis_cap"):
        rl_config(stage, tmp_path, tmp_path, max_staleness=1)


def _run(module, cfg) -> tuple[dict, list[dict]]:
    run_dir = RunDir.open(cfg)
    summary = run_dir.finish(module.run(cfg, run_dir))
    lines = (run_dir.path / "metrics.jsonl").read_text().splitlines()
    return summary, [json.loads(x) for x in lines]


def _cfg(tiny_ckpt, out, **sec):
    cfg = rl_config("grpo", tiny_ckpt, out, **{**SMALL, **sec})
    optim = replace(cfg.train.optim, lr=1e-2)  # weights that visibly move in one step
    return replace(cfg, train=replace(cfg.train, optim=optim))


@pytest.fixture
def length_reward(monkeypatch):
    """GRPO's reward → the response's length in characters: it varies within a group even
    for an untrained model (a rule reward is 0 everywhere there), so the weights move."""
    monkeypatch.setattr(grpo, "weighted_reward", lambda *a: lambda text, row: float(len(text)))


@pytest.mark.slow
def test_async_grpo_samples_with_stale_weights(tmp_path, tiny_ckpt, monkeypatch, length_reward):
    calls, real = [], rl_iteration.sample_rollouts

    def spy(sampler, weights, prompts, tok, *, key, **kw):
        leaves = [np.asarray(x) for x in jax.tree.leaves(weights)]
        calls.append((np.asarray(jax.random.key_data(key)), leaves))
        return real(sampler, weights, prompts, tok, key=key, **kw)

    monkeypatch.setattr(rl_iteration, "sample_rollouts", spy)
    cfg = _cfg(tiny_ckpt, tmp_path / "k1", iterations=2, max_staleness=1, checkpoint_every=0)
    summary, rows = _run(grpo, cfg)
    assert [r["staleness"] for r in rows] == [0, 1] and summary["steps"] == 2
    for it, (key, _) in enumerate(calls, 1):  # the synchronous loop's rollout keys
        want = jax.random.key_data(jax.random.fold_in(jax.random.key(cfg.seed), it))
        np.testing.assert_array_equal(key, np.asarray(want))
    (_, w1), (_, w2) = calls
    assert all(np.array_equal(a, b) for a, b in zip(w1, w2))  # both the start weights
    # iteration 1 is on-policy; iteration 2 one update behind: its IS weights move off 1,
    # while the sampler agrees with the learner at the weights that sampled
    assert abs(rows[0]["tis_weight"] - 1) < 1e-4 and "policy_shift" not in rows[0]
    assert rows[1]["policy_shift"] > 1e-3 and abs(rows[1]["tis_weight"] - 1) > 1e-4, rows[1]
    assert all(r["logprob_gap"] < 1e-4 for r in rows)
    assert summary["rollout_wait_seconds"] >= 0 and summary["seconds_per_iteration"] > 0


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x == y, (x, y)


@pytest.mark.slow
def test_async_grpo_is_deterministic_and_resumes(tmp_path, tiny_ckpt, length_reward):
    """Same config and seed → the same rows; killed after its checkpoint at iteration 2, a
    run repeats iterations 3 and 4 exactly (the pipeline restarts at every resume
    checkpoint, in the uninterrupted run too); iteration 1 (staleness 0) is the
    synchronous run's."""
    sec = dict(iterations=4, max_staleness=1, checkpoint_every=2)
    summary, rows = _run(grpo, _cfg(tiny_ckpt, tmp_path / "a", **sec))
    assert [r["staleness"] for r in rows] == [0, 1, 0, 1]
    cfg = _cfg(tiny_ckpt, tmp_path / "b", **sec)
    _, again = _run(grpo, cfg)
    _same(rows, again)
    shutil.rmtree(tmp_path / "b/resume/4")
    shutil.rmtree(tmp_path / "b/checkpoints")
    (tmp_path / "b/summary.json").unlink()
    resumed, again = _run(grpo, cfg)
    assert resumed["resumed_from_iteration"] == 2
    _same(rows, again)
    for key in ("final_loss", "final_tis_weight", "steps"):
        assert resumed[key] == summary[key], key
    _, sync = _run(grpo, _cfg(tiny_ckpt, tmp_path / "k0", iterations=2, max_staleness=0))
    _same(sync[:1], [{k: v for k, v in rows[0].items() if k != "staleness"}])
    assert sync[1]["loss"] != rows[1]["loss"]  # iteration 2: other sampling weights


@pytest.mark.slow
def test_error_in_the_producer_thread_ends_the_run(tmp_path, tiny_ckpt, monkeypatch):
    calls = []

    def failing(text, row):  # grpo's accuracy rule, run in the producer thread
        calls.append(threading.current_thread().name)
        if len(calls) > 8:  # iteration 2's rollouts (8 rows an iteration)
            raise RuntimeError("injected reward failure")
        return 0.0

    monkeypatch.setattr(grpo, "arithmetic", failing)
    cfg = _cfg(tiny_ckpt, tmp_path / "e", iterations=3, max_staleness=1)
    err = within(300, _run, grpo, cfg)
    assert isinstance(err, RuntimeError) and "injected reward failure" in str(err)
    assert set(calls) == {"jaxllm-rollouts"}
    lines = (tmp_path / "e/metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1]  # iteration 1 trained, then stop


@pytest.mark.slow
def test_async_ppo(tmp_path, tiny_ckpt, monkeypatch):
    monkeypatch.setattr(ppo, "get_reward", lambda *a: lambda text, row: float(len(text)))
    sec = dict(iterations=3, max_new_tokens=6, eval_examples=0, rollout_batch=8,
               minibatch_size=8, epochs=1, tis_cap=2.0, max_staleness=1, reward="digits")  # fmt: skip
    cfg = rl_config("ppo", tiny_ckpt, tmp_path / "ppo", **sec)
    cfg = replace(cfg, train=replace(cfg.train, optim=replace(cfg.train.optim, lr=1e-2)))
    summary, rows = _run(ppo, cfg)
    assert [r["staleness"] for r in rows] == [0, 1, 1] and summary["steps"] == 3
    assert all(r["logprob_gap"] < 1e-4 for r in rows)
    assert rows[1]["policy_shift"] > 1e-3 and abs(rows[1]["tis_weight"] - 1) > 1e-4


@pytest.mark.slow
def test_async_sigterm_keeps_the_last_checkpoint(tmp_path, tiny_ckpt, monkeypatch):
    """With rollouts drawn ahead, a preemption notice between checkpoints saves nothing new
    (the host RNG is already past the iteration): the run stops at once and goes on from its
    last checkpoint, repeating the uninterrupted run."""
    sec = dict(iterations=4, max_staleness=1, checkpoint_every=2)
    _, rows = _run(grpo, _cfg(tiny_ckpt, tmp_path / "a", **sec))
    calls = []

    def reward(text, row):  # scored in the producer thread: iteration 3's first row
        calls.append(1)
        if len(calls) == 8 * 2 + 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return 0.0

    cfg = _cfg(tiny_ckpt, tmp_path / "b", **sec)
    with monkeypatch.context() as m:
        m.setattr(grpo, "arithmetic", reward)
        with pytest.raises(Preempted, match=r"the rerun goes on from .*resume/2;"):
            _run(grpo, cfg)
    assert sorted(p.name for p in (tmp_path / "b/resume").iterdir()) == ["2"]
    resumed, again = _run(grpo, cfg)
    assert resumed["resumed_from_iteration"] == 2
    _same(rows, again)
