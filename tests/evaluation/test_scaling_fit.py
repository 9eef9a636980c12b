"""Scaling-law fits against ground truth: losses generated from a known law with noise give
back its constants; the compute-optimal allocation equals a numerical minimisation."""

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from jaxllm.evaluation.scaling import (
    bootstrap,
    chinchilla_loss,
    chinchilla_start,
    compute_optimal,
    fit_chinchilla,
    fit_power_law,
)

TRUE = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}  # Hoffmann et al.'s


def synthetic(noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = np.repeat(np.geomspace(1e6, 3e8, 6), 4)
    d = np.tile(np.geomspace(2e8, 2e10, 4), 6)
    loss = chinchilla_loss(n, d, TRUE) * np.exp(rng.normal(0, noise, n.size))
    return n, d, loss


def test_chinchilla_fit_recovers_known_constants():
    fit = fit_chinchilla(*synthetic(0.0))
    for k in TRUE:  # noise-free: the optimiser runs to the optimum (scipy's default ftol
        assert fit[k] == pytest.approx(TRUE[k], rel=1e-4)  # stopped E 1 % short of it)
    fit = fit_chinchilla(*synthetic(0.005))
    assert fit["E"] == pytest.approx(TRUE["E"], rel=0.1)
    assert fit["alpha"] == pytest.approx(TRUE["alpha"], abs=0.05)
    assert fit["beta"] == pytest.approx(TRUE["beta"], abs=0.05)
    n, d, loss = synthetic(0.005, seed=1)
    rel = np.abs(chinchilla_loss(n, d, fit) / loss - 1)
    assert rel.max() < 0.03  # it predicts data it was not fitted on


def test_power_law_fit_recovers_a_one_variable_law():
    x = np.geomspace(1e5, 1e9, 12)
    loss = 2.0 + 150.0 / x**0.3
    fit = fit_power_law(x, loss)
    assert (fit["E"], fit["alpha"]) == (pytest.approx(2.0, rel=0.01), pytest.approx(0.3, rel=0.02))


def test_compute_optimal_is_the_minimum_under_the_budget():
    for c in (1e18, 1e21, 1e24):
        got = compute_optimal(c, TRUE)

        def loss_at(log_n, c=c):
            return chinchilla_loss(np.exp(log_n), c / (6 * np.exp(log_n)), TRUE)

        res = minimize_scalar(loss_at, bounds=(5, 40), method="bounded", options={"xatol": 1e-9})
        assert float(got["N"]) == pytest.approx(np.exp(res.x), rel=1e-3)
        assert float(got["D"] * got["N"] * 6) == pytest.approx(c)


def test_bootstrap_intervals_cover_the_truth():
    data = synthetic(0.005)
    start = chinchilla_start(fit_chinchilla(*data))

    def refit(n, d, loss):
        return fit_chinchilla(n, d, loss, starts=[start])

    ci = bootstrap(refit, data, n=40)
    for k, width in (("alpha", 0.01), ("beta", 0.02), ("E", 0.1)):
        lo, hi = ci[k]  # refits that stopped near their start gave intervals ~10x too narrow
        assert hi - lo > width and lo - 0.005 <= TRUE[k] <= hi + 0.005, (k, lo, hi)
