"""The sampler/learner agreement check decides on the mean gap over response tokens: one
token's f32 rounding outlier passes, stale weights (every token off) and a single stale row
in a batch fail. Figures against numpy means and maxima over the masked tokens."""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm.trainers.rollout import StaleRollout, logprob_gap


def _batch(b=16, length=12, seed=0):
    rng = np.random.default_rng(seed)
    learner = -rng.gamma(2.0, 1.5, (b, length)).astype(np.float32)
    mask = np.zeros((b, length), np.float32)
    for i in range(b):
        start = rng.integers(2, 6)
        mask[i, start : start + rng.integers(2, 5)] = 1.0  # 2–4 response tokens per row
    noise = rng.uniform(-2e-6, 2e-6, (b, length)).astype(np.float32)  # f32 rounding
    return learner, learner + noise, mask


def _numpy_gap(sampler, learner, mask):
    d = np.abs(sampler.astype(np.float64) - learner) * mask
    return d.sum() / mask.sum(), d.max()


def test_gap_is_the_mean_and_max_over_response_tokens():
    learner, sampler, mask = _batch()
    sampler[0, :] += 5.0 * (1 - mask[0])  # prompt / padding positions do not count
    mean, worst = logprob_gap(sampler, learner, mask, 1e-4)
    want_mean, want_max = _numpy_gap(sampler, learner, mask)
    assert mean == pytest.approx(want_mean, rel=1e-4) and worst == pytest.approx(want_max, rel=1e-4)
    assert worst < 1e-5


def test_one_rounding_outlier_passes():
    learner, sampler, mask = _batch()
    i, j = np.argwhere(mask)[7]
    sampler[i, j] = learner[i, j] - 1.2e-4  # as measured after 67 GRPO iterations
    mean, worst = logprob_gap(sampler, learner, mask, 1e-4)
    assert worst == pytest.approx(1.2e-4, rel=1e-2) and mean < 1e-5


def test_stale_weights_fail():
    learner, _, mask = _batch()
    rng = np.random.default_rng(1)
    stale = learner + rng.normal(0, 3e-3, learner.shape).astype(np.float32)  # one step old
    with pytest.raises(StaleRollout, match="logprob_tol"):
        logprob_gap(stale, learner, mask, 1e-4)


def test_one_stale_row_fails():
    learner, sampler, mask = _batch()
    sampler[5] = learner[5] + 0.05 * mask[5]  # one rollout sampled with other weights
    assert _numpy_gap(sampler, learner, mask)[0] > 1e-4
    with pytest.raises(StaleRollout):
        logprob_gap(sampler, learner, mask, 1e-4)


def test_non_finite_fails():
    learner, sampler, mask = _batch()
    i, j = np.argwhere(mask)[0]
    sampler[i, j] = np.nan
    with pytest.raises(StaleRollout):
        logprob_gap(sampler, learner, mask, 1e-4)
