"""`stage: scaling` — fit scaling laws on a sweep of small pretraining runs, predict a bigger
model's loss before training it, then train it and check the prediction.

Every run is the real `stage: pretrain` (the `scaling.base` config with the size, budget and
learning rate the rule gives), in `<run>/runs/L<layers>_T<tokens>/`; a run whose summary
exists is not run again, so an interrupted sweep resumes. With `scaling.schedule: wsd` each
size's largest budget runs first (the trunk, warmup-stable-decay) and every smaller budget's
run starts from the trunk's checkpoint where its own cooldown begins (`wsd_branch.py`).

The fits (evaluation/scaling.py):
Kaplan's L(N) at the largest budget and L(D) at the largest size, Chinchilla's L(N, D) with
bootstrap intervals, the compute-optimal N*(C), D*(C). The prediction for the held-out model
is written to `prediction.json` before that model trains. N is `scaling.params`: total
parameters (default, Hoffmann et al.'s count) or non-embedding ones (Kaplan's), the same N in
every fit, the prediction and the compute unit: the compute-optimal table's budgets C are
6 N D for that N (`compute_unit` in the summary says which), not the runs' `flops` (the
project's own count: the output layer and attention included), which stay in the runs' rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.config import Config, ModelConfig, load_config, replace
from jaxllm.errors import ConfigError
from jaxllm.evaluation.scaling import (
    bootstrap,
    chinchilla_loss,
    chinchilla_start,
    compute_optimal,
    fit_chinchilla,
    fit_power_law,
)
from jaxllm.models.flops import param_count, train_flops_per_token
from jaxllm.rundir import RunDir, atomic_write_text, is_finished
from jaxllm.sharding.multihost import is_primary
from jaxllm.tokenizer.hf import load_tokenizer
from jaxllm.trainers.wsd_branch import branch_step, seed_branch


def size_model(m: ModelConfig, cfg: Config, layers: int) -> ModelConfig:
    """The sweep's model of `layers` layers: width aspect * layers, heads of head_dim."""
    s = cfg.scaling
    d = s.aspect * layers
    if d % s.head_dim:
        raise ConfigError(f"config key 'scaling.head_dim': {s.head_dim} does not divide d {d}")
    return replace(m, preset="", n_layers=layers, d_model=d, n_heads=d // s.head_dim,
                   n_kv_heads=0, head_dim=0, d_ff=4 * d)  # fmt: skip


def run_config(
    cfg: Config, base: Config, run_dir: Path, layers: int, tokens: int,
    checkpoint_at: tuple[int, ...] = (),
) -> Config:  # fmt: skip
    """The pretrain config of one sweep run: its size, its budget's steps, its own schedule
    (`scaling.schedule`); `checkpoint_at`: a WSD trunk's branch points."""
    s, t = cfg.scaling, base.train
    steps = _steps(base, tokens)
    m = size_model(base.model, cfg, layers)
    lr = s.lr * s.lr_width / m.d_model
    if s.schedule == "wsd":  # one warmup in every run, so their stable phases coincide
        warmup = int(s.warmup * _steps(base, min(s.tokens)))
        optim = replace(t.optim, lr=lr, schedule="wsd", decay_fraction=s.decay_fraction,
                        warmup_steps=warmup)  # fmt: skip
    else:
        optim = replace(t.optim, lr=lr, schedule="cosine", warmup_steps=int(s.warmup * steps))
    train = replace(t, steps=steps, optim=optim, eval_every=steps, checkpoint_every=steps,
                    eval_batches=s.eval_batches, log_every=max(1, steps // 20),
                    checkpoint_at=checkpoint_at,
                    keep_checkpoints=max(t.keep_checkpoints, len(checkpoint_at) + 1))  # fmt: skip
    name = f"L{layers}_T{tokens}"
    return replace(
        base, name=name, output_dir=str(run_dir / "runs" / name), model=m, train=train,
        seed=cfg.seed, progress=cfg.progress, inputs=replace(
            base.inputs, data_dir=cfg.inputs.data_dir or base.inputs.data_dir,
            tokenizer=cfg.inputs.tokenizer or base.inputs.tokenizer),
    )  # fmt: skip


def _steps(base: Config, tokens: int) -> int:
    per_step = base.loader.batch_size * base.loader.seq_len * base.train.grad_accum
    return max(1, round(tokens / per_step))


# the N a fit uses (`scaling.params`) -> the key of the runs' rows that holds it
N_KEY = {"total": "params", "non_embedding": "N"}
UNIT = {
    "total": "C = 6 N D, N = total parameters (embeddings included)",
    "non_embedding": "C = 6 N D, N = non-embedding parameters",
}


def _row(sub: Config, summary: dict[str, Any], vocab: int) -> dict[str, Any]:
    m = sub.model if sub.model.vocab_size else replace(sub.model, vocab_size=vocab)
    tokens = summary["tokens_seen"]
    loss = summary.get("val_loss")
    if loss is None:
        raise ConfigError(f"{sub.run_dir}: the run has no validation loss (no val split?)")
    return {
        "name": sub.name, "layers": m.n_layers, "d_model": m.d_model,
        "N": param_count(m, exclude_embeddings=True), "params": summary["params"],
        "D": tokens, "flops": train_flops_per_token(m, sub.loader.seq_len) * tokens,
        "lr": sub.train.optim.lr, "val_loss": loss,
    }  # fmt: skip


def run(cfg: Config, run_dir: RunDir) -> dict[str, Any]:
    s = cfg.scaling
    base = _base(cfg)
    vocab = load_tokenizer(cfg.inputs.tokenizer or base.inputs.tokenizer).vocab_size
    grid, steps = [], {"trained": 0, "from_scratch": 0}
    for layers in s.layers:
        for sub, summary, trained in _train_size(cfg, base, run_dir.path, layers):
            grid.append(_row(sub, summary, vocab))
            steps["trained"] += trained
            steps["from_scratch"] += sub.train.steps
    fits = _fits(grid, s.bootstrap, cfg.seed, s.params)
    # the sweep's cost in optimizer steps (the held-out model's excluded): with wsd each
    # size trains its largest budget and the cooldowns, not every budget from scratch
    summary: dict[str, Any] = {"runs": grid, "schedule": s.schedule, "sweep_steps": steps, **fits}
    if s.holdout_layers:
        summary["prediction"] = _holdout(cfg, base, run_dir.path, fits["chinchilla"], vocab)
    plot = _plot(summary, run_dir.path / "scaling.png")
    summary["plot"] = plot
    return summary


def _train_size(cfg: Config, base: Config, path: Path, layers: int):
    """(config, summary, steps trained) of one size's run per budget, in `scaling.tokens`
    order. With wsd the largest budget's run (the trunk) saves a checkpoint where each smaller
    budget's cooldown begins, and each of those runs starts from it (`wsd_branch`)."""
    from jaxllm.trainers import run_stage

    s = cfg.scaling
    subs = {t: run_config(cfg, base, path, layers, t) for t in s.tokens}
    start = dict.fromkeys(s.tokens, 0)
    if s.schedule == "wsd":
        top = max(s.tokens)
        start = {t: 0 if t == top else branch_step(subs[top], sub) for t, sub in subs.items()}
        points = tuple(sorted({b for b in start.values() if b > 0}))
        subs[top] = trunk = run_config(cfg, base, path, layers, top, checkpoint_at=points)
        run_stage(trunk, reuse_finished=True)
        for t, b in start.items():
            if b > 0 and not seed_branch(trunk, subs[t], b):
                start[t] = 0
    return [
        (sub, run_stage(sub, reuse_finished=True), sub.train.steps - start[t])
        for t, sub in subs.items()
    ]


def _base(cfg: Config) -> Config:
    path = Path(cfg.scaling.base)
    if not path.is_file():
        path = Path(__file__).resolve().parents[2] / "configs" / cfg.scaling.base
    if not path.is_file():
        raise ConfigError(f"config key 'scaling.base': {cfg.scaling.base} not found")
    base = load_config(path)
    if base.stage != "pretrain":
        raise ConfigError(f"config key 'scaling.base': {path} is stage {base.stage}, not pretrain")
    return base


def _fits(grid: list[dict], n_boot: int, seed: int, params: str) -> dict[str, Any]:
    """Every fit on N = the rows' `N_KEY[params]`; the compute-optimal table at budgets in the
    same unit, C = 6 N D, from the smallest run's to 100x the largest run's (None when the
    fit has no optimum: a fitted exponent <= 0)."""
    n, d, loss = (np.array([r[k] for r in grid], float) for k in (N_KEY[params], "D", "val_loss"))
    fit = fit_chinchilla(n, d, loss)
    start = chinchilla_start(fit)
    ci = bootstrap(lambda *c: fit_chinchilla(*c, starts=[start]), (n, d, loss), n_boot, seed)
    big_d, big_n = d == d.max(), n == n.max()
    kaplan_n = np.array([r["N"] for r in grid], float)
    budgets = np.geomspace((6 * n * d).min(), (6 * n * d).max() * 100, 5)
    optimal = compute_optimal(budgets, fit)
    return {
        "params": params,
        "chinchilla": fit,
        "chinchilla_ci90": ci,
        "residuals": [round(float(x), 4) for x in chinchilla_loss(n, d, fit) / loss - 1],
        # Kaplan et al.'s L(N) is on non-embedding N, whatever `params` says
        "kaplan_N": fit_power_law(kaplan_n[big_d], loss[big_d]) if big_d.sum() >= 3 else None,
        "kaplan_D": fit_power_law(d[big_n], loss[big_n]) if big_n.sum() >= 3 else None,
        "compute_unit": UNIT[params],
        "compute_optimal": [
            {"C": float(c), "N": float(a), "D": float(b), "tokens_per_param": float(r)}
            for c, a, b, r in zip(budgets, optimal["N"], optimal["D"], optimal["tokens_per_param"])
        ]
        if np.isfinite(optimal["N"]).all()
        else None,
    }


def _holdout(cfg: Config, base: Config, run_dir: Path, fit: dict, vocab: int) -> dict[str, Any]:
    """Predicts the held-out model's loss (saved before it trains), trains it, compares."""
    from jaxllm.trainers import run_stage

    s = cfg.scaling
    sub = run_config(cfg, base, run_dir, s.holdout_layers, s.holdout_tokens)
    m = size_model(base.model, cfg, s.holdout_layers)
    m = m if m.vocab_size else replace(m, vocab_size=vocab)
    n = param_count(m, exclude_embeddings=s.params == "non_embedding")
    pred = _prediction(run_dir / "prediction.json", sub.name, s.params, n, _tokens(sub), fit,
                       trained=is_finished(sub.run_dir))  # fmt: skip
    row = _row(sub, run_stage(sub, reuse_finished=True), vocab)
    pred.update(measured=row["val_loss"], row=row)
    pred["relative_error"] = round(pred["predicted"] / pred["measured"] - 1, 4)
    return pred


def _prediction(path: Path, name: str, params: str, n: int, d: int, fit: dict, trained: bool):
    """The prediction in `path` if it was made on this N (`params`; a file without the key
    predates the choice: non-embedding), else a new one written there; a new one made after
    the held-out model trained says so (`after_training`) and keeps the file's earlier one."""
    old = json.loads(path.read_text()) if path.is_file() else None
    if old is not None and old.get("params", "non_embedding") == params:
        return old
    pred = {"name": name, "params": params, "N": n, "D": d,
            "predicted": float(chinchilla_loss(n, d, fit))}  # fmt: skip
    if trained:
        pred["after_training"] = True
    if old is not None:
        pred["earlier"] = old
    if is_primary():
        atomic_write_text(path, json.dumps(pred, indent=1) + "\n")
    return pred


def _tokens(sub: Config) -> int:
    return sub.train.steps * sub.loader.batch_size * sub.loader.seq_len * sub.train.grad_accum


def _plot(summary: dict[str, Any], out: Path) -> str | None:
    if not is_primary():
        return None
    from jaxllm.trainers.scaling_plot import plot_scaling

    plot_scaling(summary, out)
    return out.name
