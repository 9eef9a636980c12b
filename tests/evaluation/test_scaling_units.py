"""The compute-optimal table's unit: budgets C = 6 N D for the N the fit is made on
(`scaling.params`: total or non-embedding parameters), checked against Hoffmann et al.'s
closed form written out by hand and a brute-force minimisation of L(N, C / (6 N)); and the
held-out prediction's record when the choice of N changes."""

import json

import numpy as np
import pytest

from jaxllm.config import from_dict
from jaxllm.errors import ConfigError
from jaxllm.evaluation.scaling import compute_optimal
from jaxllm.trainers.scaling import _fits, _prediction

LAW = {"E": 1.5, "A": 900.0, "alpha": 0.45, "B": 600.0, "beta": 0.35}
# the tiny sweep's sizes: (non-embedding, total) parameters of 1, 2, 3, 4, 6 layers
SIZES = [(12768, 272864), (100096, 620288), (335712, 1116000), (793344, 1833728),
         (2669568, 4230144)]  # fmt: skip
TOKENS = [249856, 499712, 999424]


def law(n, d):
    return LAW["E"] + LAW["A"] / n ** LAW["alpha"] + LAW["B"] / d ** LAW["beta"]


def hand_optimum(c):
    """Hoffmann et al. (2022), eq. 4: N_opt = G (C/6)^(b/(a+b)), D_opt = (C/6)^(a/(a+b)) / G."""
    a, b = LAW["alpha"], LAW["beta"]
    g = (a * LAW["A"] / (b * LAW["B"])) ** (1 / (a + b))
    return g * (c / 6) ** (b / (a + b)), (c / 6) ** (a / (a + b)) / g


def brute_force(c):
    n = np.geomspace(1e1, 1e14, 1_300_001)
    return n[np.argmin(law(n, c / (6 * n)))]


def test_closed_form_is_hoffmanns_and_the_brute_force_minimum():
    for c in (1e10, 1e15, 1e21):
        got = compute_optimal(c, LAW)
        n, d = hand_optimum(c)
        assert (float(got["N"]), float(got["D"])) == (pytest.approx(n), pytest.approx(d))
        assert float(got["N"]) == pytest.approx(brute_force(c), rel=2e-5)
        assert float(got["tokens_per_param"]) == pytest.approx(d / n)


@pytest.mark.parametrize("params", ["total", "non_embedding"])
def test_optimal_table_is_in_6ND_of_the_fits_N(params, monkeypatch):
    col = 1 if params == "total" else 0
    grid = [
        {"N": ne, "params": tot, "D": d, "val_loss": law((ne, tot)[col], d),
         "flops": 21.7 * 6 * ne * d}  # the project's count: not the unit of the table
        for ne, tot in SIZES for d in TOKENS
    ]  # fmt: skip
    seen = []  # the fit is the law (fitting it is test_scaling_fit's); record the N it gets

    def fit(n, d, loss, starts=None):
        seen.append(np.asarray(n))
        return {**LAW, "huber": 0.0}

    monkeypatch.setattr("jaxllm.trainers.scaling.fit_chinchilla", fit)
    monkeypatch.setattr("jaxllm.trainers.scaling.fit_power_law", lambda x, loss: {})
    out = _fits(grid, n_boot=2, seed=0, params=params)
    assert list(seen[0]) == [r[col] for r in SIZES for _ in TOKENS]  # the full fit's N column
    assert all(set(n) <= {r[col] for r in SIZES} for n in seen[1:])  # the bootstrap refits' too
    assert out["params"] == params and params.replace("_", "-") in out["compute_unit"]
    smallest = 6 * SIZES[0][col] * TOKENS[0]  # by hand: the smallest run's 6 N D
    largest = 6 * SIZES[-1][col] * TOKENS[-1]
    rows = out["compute_optimal"]
    assert rows[0]["C"] == pytest.approx(smallest) and rows[-1]["C"] == pytest.approx(100 * largest)
    for row in rows:
        n, d = hand_optimum(row["C"])
        assert row["N"] == pytest.approx(n) and row["D"] == pytest.approx(d)
        assert row["N"] == pytest.approx(brute_force(row["C"]), rel=2e-5)
        assert 6 * row["N"] * row["D"] == pytest.approx(row["C"])


def test_no_optimum_when_a_fitted_exponent_is_not_positive(monkeypatch):
    for bad in ({**LAW, "beta": -0.1}, {**LAW, "alpha": 0.0}):  # was complex, then a TypeError
        assert np.isnan(compute_optimal([1e12, 1e15], bad)["N"]).all()
    monkeypatch.setattr(
        "jaxllm.trainers.scaling.fit_chinchilla", lambda *a, **k: {**LAW, "beta": -0.1}
    )
    monkeypatch.setattr("jaxllm.trainers.scaling.fit_power_law", lambda x, loss: {})
    grid = [{"N": ne, "params": tot, "D": d, "val_loss": 5.0} for ne, tot in SIZES for d in TOKENS]
    assert _fits(grid, n_boot=2, seed=0, params="total")["compute_optimal"] is None


def test_prediction_is_remade_when_the_fits_N_changes(tmp_path):
    path, fit = tmp_path / "prediction.json", dict(LAW)
    first = _prediction(path, "L10_T500000", "total", 14931200, 499712, fit, trained=False)
    assert first["predicted"] == pytest.approx(law(14931200, 499712))
    assert "after_training" not in first and json.loads(path.read_text()) == first
    # written once: a rerun reads it back even if the fit moved
    assert _prediction(path, "L10_T500000", "total", 14931200, 499712, {**fit, "E": 9.0},
                       trained=True) == first  # fmt: skip
    # a file from before `scaling.params` (no key: non-embedding N) is not reused for total N
    legacy = {"name": "L10_T500000", "N": 12330240, "D": 499712, "predicted": 4.6353}
    path.write_text(json.dumps(legacy))
    new = _prediction(path, "L10_T500000", "total", 14931200, 499712, fit, trained=True)
    assert new["N"] == 14931200 and new["predicted"] == pytest.approx(law(14931200, 499712))
    assert new["after_training"] is True and new["earlier"] == legacy
    assert json.loads(path.read_text()) == new


def test_params_choice_is_checked():
    assert from_dict({"stage": "scaling"}).scaling.params == "total"
    with pytest.raises(ConfigError, match=r"config key 'scaling.params': must be 'total' or"):
        from_dict({"stage": "scaling", "scaling": {"params": "embedding"}})
