"""Scaling-law fits: loss as a function of parameters N and training tokens D.

- `fit_power_law(x, L)`: Kaplan et al. (2020)'s one-variable form L(x) = E + A / x^alpha
  (x = N at a fixed budget, or D at a fixed size), with an irreducible term E.
- `fit_chinchilla(N, D, L)`: Hoffmann et al. (2022)'s parametric form
  L(N, D) = E + A / N^alpha + B / D^beta, fitted as their approach 3: a Huber loss (delta
  1e-3) between log L and log of the prediction, written as a log-sum-exp over
  (a - alpha log N, b - beta log D, e) with A = e^a, B = e^b, E = e^e, minimised with L-BFGS
  from a grid of starting points (the best one is kept).
- `compute_optimal(C, fit)`: the N*, D* that minimise L(N, D) under C = 6 N D:
  N* = G (C/6)^(beta/(alpha+beta)), D* = (C/6)^(alpha/(alpha+beta)) / G with
  G = (alpha A / (beta B))^(1/(alpha+beta)), and their ratio D*/N*; C is 6 N D in the fit's
  own N (total or non-embedding parameters), not a model's full FLOP count.
- `bootstrap(fit_fn, columns, n)`: percentile intervals of every fitted constant over fits
  to rows resampled with replacement.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np
from scipy.optimize import minimize
from scipy.special import huber, logsumexp

CHINCHILLA_KEYS = ("E", "A", "alpha", "B", "beta")


def chinchilla_loss(n, d, fit: dict[str, float]):
    """E + A / N^alpha + B / D^beta."""
    n, d = np.asarray(n, float), np.asarray(d, float)
    return fit["E"] + fit["A"] / n ** fit["alpha"] + fit["B"] / d ** fit["beta"]


def _huber_lse(log_xs: Sequence[np.ndarray], log_l: np.ndarray, delta: float) -> Callable:
    """The objective and its gradient for p = (a_1..a_k, e, alpha_1..alpha_k): the sum over
    rows of huber(logsumexp(a_i - alpha_i log x_i ..., e) - log L)."""
    k = len(log_xs)
    xs = np.stack(log_xs)  # [k, rows]

    def fg(p):
        a, e, alpha = p[:k], p[k], p[k + 1 :]
        terms = np.concatenate([a[:, None] - alpha[:, None] * xs, np.full((1, xs.shape[1]), e)])
        lse = logsumexp(terms, axis=0)
        r = lse - log_l
        dr = np.clip(r, -delta, delta)  # huber's derivative
        w = np.exp(terms - lse) * dr  # [k + 1, rows]
        grad = np.concatenate([w[:k].sum(1), [w[k].sum()], -(w[:k] * xs).sum(1)])
        return float(np.sum(huber(delta, r))), grad

    return fg


# L-BFGS-B stops when an iteration improves f by under ftol * max(|f|, 1): the Huber sums
# here are ~1e-5, so scipy's default ftol (2.2e-9) stopped a fit (and every bootstrap refit
# started at the full fit) a few iterations from where it began.
_TIGHT = {"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10_000}


def _best_of(fg: Callable, starts: Sequence[np.ndarray]) -> tuple[np.ndarray, float]:
    best = None
    for x0 in starts:
        res = minimize(fg, np.asarray(x0, float), jac=True, method="L-BFGS-B", options=_TIGHT)
        if best is None or res.fun < best.fun:
            best = res
    return best.x, float(best.fun)


CHINCHILLA_GRID = [np.array([a, b, e, al, be]) for a, b, e, al, be in itertools.product(
    (0.0, 6.0, 12.0), (0.0, 6.0, 12.0), (0.5,), (0.2, 0.6), (0.2, 0.6))]  # fmt: skip


def fit_chinchilla(n, d, loss, delta: float = 1e-3, starts=None) -> dict[str, float]:
    """Hoffmann et al.'s approach 3 (see the module docstring) from a grid of starting points
    (or `starts`, in the (a, b, e, alpha, beta) order); returns the constants and the
    objective's value at the optimum (`huber`)."""
    log_n, log_d, log_l = (np.log(np.asarray(v, float)) for v in (n, d, loss))
    fg = _huber_lse([log_n, log_d], log_l, delta)
    (a, b, e, alpha, beta), value = _best_of(fg, CHINCHILLA_GRID if starts is None else starts)
    return {"E": float(np.exp(e)), "A": float(np.exp(a)), "alpha": float(alpha),
            "B": float(np.exp(b)), "beta": float(beta), "huber": value}  # fmt: skip


def chinchilla_start(fit: dict[str, float]) -> np.ndarray:
    """A fit as a starting point for `fit_chinchilla(starts=[...])` (bootstrap refits)."""
    return np.array(
        [np.log(fit["A"]), np.log(fit["B"]), np.log(fit["E"]), fit["alpha"], fit["beta"]]
    )


def fit_power_law(x, loss, delta: float = 1e-3) -> dict[str, float]:
    """L(x) = E + A / x^alpha, fitted like `fit_chinchilla` (Huber on log-loss)."""
    log_x, log_l = np.log(np.asarray(x, float)), np.log(np.asarray(loss, float))
    fg = _huber_lse([log_x], log_l, delta)
    grid = [
        np.array(g) for g in itertools.product((0.0, 5.0, 10.0), (-1.0, 0.0, 1.0), (0.1, 0.3, 0.6))
    ]
    (a, e, alpha), value = _best_of(fg, grid)
    return {"E": float(np.exp(e)), "A": float(np.exp(a)), "alpha": float(alpha), "huber": value}


def compute_optimal(compute, fit: dict[str, float]) -> dict[str, np.ndarray]:
    """N*(C), D*(C) = C / (6 N*) and D*/N* for compute budgets C, from a Chinchilla fit.

    C is in the unit 6 N D for the N the fit was made on (total or non-embedding parameters):
    a model's full FLOP count (output layer, attention) is a different, larger number. With a
    fitted alpha or beta <= 0 (a degenerate fit: the loss does not fall with N or with D)
    there is no optimum: NaN."""
    c = np.asarray(compute, float)
    alpha, beta = fit["alpha"], fit["beta"]
    if not (alpha > 0 and beta > 0):
        nan = np.full_like(c, np.nan)
        return {"N": nan, "D": nan, "tokens_per_param": nan}
    g = (alpha * fit["A"] / (beta * fit["B"])) ** (1.0 / (alpha + beta))
    n = g * (c / 6.0) ** (beta / (alpha + beta))
    d = c / (6.0 * n)
    return {"N": n, "D": d, "tokens_per_param": d / n}


def bootstrap(
    fit_fn: Callable[..., dict[str, float]], columns: Sequence, n: int = 200, seed: int = 0,
    level: float = 0.9,
) -> dict[str, tuple[float, float]]:  # fmt: skip
    """(low, high) percentile interval at `level` of each constant `fit_fn(*columns)` returns,
    over `n` fits to rows resampled with replacement."""
    rng = np.random.default_rng(seed)
    cols = [np.asarray(c, float) for c in columns]
    rows = len(cols[0])
    fits = [fit_fn(*(c[idx] for c in cols)) for idx in rng.integers(0, rows, (n, rows))]
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    keys = [k for k in fits[0] if k != "huber"]
    return {k: tuple(float(v) for v in np.percentile([f[k] for f in fits], [lo, hi])) for k in keys}
