"""The scaling stage's figure: loss vs compute per size with the fitted frontier, loss vs N
at each budget, IsoFLOP curves, and predicted vs measured (the held-out model marked)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.evaluation.scaling import chinchilla_loss, compute_optimal


def plot_scaling(summary: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxllm.trainers.scaling import N_KEY

    runs, fit = summary["runs"], summary["chinchilla"]
    params = summary.get("params", "non_embedding")  # summaries before the choice: Kaplan's N
    runs = [{**r, "N": r[N_KEY[params]]} for r in runs]  # the fit's N; C = 6 N D in the same unit
    fig, ax = plt.subplots(2, 2, figsize=(11, 8.5))
    sizes = sorted({r["layers"] for r in runs})
    for layers in sizes:
        rs = sorted((r for r in runs if r["layers"] == layers), key=lambda r: r["D"])
        ax[0, 0].plot([6 * r["N"] * r["D"] for r in rs], [r["val_loss"] for r in rs], "o-",
                      label=f"{layers} layers, N {rs[0]['N'] / 1e6:.2f} M")  # fmt: skip
    c = np.geomspace(
        min(6 * r["N"] * r["D"] for r in runs), 10 * max(6 * r["N"] * r["D"] for r in runs), 50
    )
    opt = compute_optimal(c, fit)  # NaN (nothing drawn) when the fit has no optimum
    ax[0, 0].plot(c, chinchilla_loss(opt["N"], opt["D"], fit), "k--", label="fitted frontier")
    ax[0, 0].set(
        xscale="log",
        xlabel=f"compute C = 6ND (N: {params})",
        ylabel="val loss",
        title="loss vs compute",
    )
    ax[0, 0].legend(fontsize=7)
    n_grid = np.geomspace(min(r["N"] for r in runs) / 2, max(r["N"] for r in runs) * 8, 60)
    for d in sorted({r["D"] for r in runs}):
        rs = [r for r in runs if r["D"] == d]
        line = ax[0, 1].plot([r["N"] for r in rs], [r["val_loss"] for r in rs], "o")[0]
        ax[0, 1].plot(n_grid, chinchilla_loss(n_grid, d, fit), "-", color=line.get_color(),
                      label=f"D {d / 1e6:.2f} M tokens")  # fmt: skip
    ax[0, 1].set(
        xscale="log", xlabel=f"parameters N ({params})", ylabel="val loss", title="loss vs N"
    )
    ax[0, 1].legend(fontsize=7)
    for budget in np.geomspace(c[0], c[-1], 4):
        ax[1, 0].plot(
            n_grid, chinchilla_loss(n_grid, budget / (6 * n_grid), fit), label=f"C {budget:.1e}"
        )
        best = compute_optimal(budget, fit)
        ax[1, 0].plot(best["N"], chinchilla_loss(best["N"], best["D"], fit), "k*")
    ax[1, 0].set(xscale="log", xlabel="N", ylabel="fitted loss", title="IsoFLOP curves (* optimum)")
    ax[1, 0].legend(fontsize=7)
    measured = [r["val_loss"] for r in runs]
    predicted = [float(chinchilla_loss(r["N"], r["D"], fit)) for r in runs]
    ax[1, 1].plot(measured, predicted, "o", label="fitted runs")
    pred = summary.get("prediction")
    if pred and "measured" in pred:
        ax[1, 1].plot([pred["measured"]], [pred["predicted"]], "r*", ms=14,
                      label=f"held out ({pred['relative_error']:+.1%})")  # fmt: skip
    lims = [min(measured + predicted) * 0.98, max(measured + predicted) * 1.02]
    ax[1, 1].plot(lims, lims, "k:", lw=1)
    ax[1, 1].set(xlabel="measured val loss", ylabel="predicted", title="prediction check")
    ax[1, 1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
