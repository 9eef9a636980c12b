"""`stage: scaling` — a sweep of pretraining runs over model sizes × token budgets, the
scaling-law fits, and a prediction checked on a held-out bigger model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from jaxllm.config.checks import above, at_least


@dataclass(frozen=True)
class ScalingConfig:
    """Sizes follow one rule: `n_layers` from `layers`, `d_model = aspect * n_layers`, heads of
    `head_dim`, `d_ff = 4 d_model` (Kaplan et al.'s fixed aspect ratio). Every size trains on
    every budget in `tokens` with its own schedule ending at that budget (as Chinchilla
    requires), the learning rate `lr * lr_width / d_model` (larger for narrow models, a
    muP-style rule). `schedule: cosine` trains each (size, budget) from scratch with a cosine
    decay, warming up over `warmup` of its steps; `schedule: wsd` trains each size once, to the
    largest budget, at a constant rate, and cools every smaller budget down from that run's
    checkpoint over its last `decay_fraction` of steps (Hagele et al. 2024: a fraction of the
    compute; the warmup is then `warmup` of the smallest budget's steps, the same in every
    run). `holdout_layers` is a bigger model trained after
    the fit on `holdout_tokens`, whose loss the fit predicts first. `params` is the N of every
    fit and of the compute unit C = 6 N D: `total` (embeddings included, Hoffmann et al.'s
    count, so tokens per parameter compare with Chinchilla's ~20) or `non_embedding`
    (Kaplan et al.'s)."""

    base: str = "tiny_pretrain.yaml"  # the pretrain config every run starts from
    layers: tuple[int, ...] = (1, 2, 3, 4, 6)
    aspect: int = 32
    head_dim: int = 32
    tokens: tuple[int, ...] = (250_000, 500_000, 1_000_000)
    lr: float = 2e-3
    lr_width: int = 128
    warmup: float = 0.05
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_fraction: float = 0.2  # wsd: the share of each budget's steps that cools down
    holdout_layers: int = 10
    holdout_tokens: int = 500_000
    bootstrap: int = 100
    eval_batches: int = 8
    params: str = "total"  # total | non_embedding

    def _validate(self) -> None:
        if len(self.layers) < 2 or min(self.layers) < 1:
            raise ValueError(f"layers: need at least two sizes, each >= 1, got {list(self.layers)}")
        if not self.tokens or min(self.tokens) < 1:
            raise ValueError(
                f"tokens: need at least one budget, each >= 1, got {list(self.tokens)}"
            )
        at_least(self, 1, "aspect", "head_dim", "lr_width", "holdout_tokens", "bootstrap")
        at_least(self, 0, "holdout_layers", note=" (0: no held-out prediction)")
        at_least(self, 0, "eval_batches", note=" (0: the whole validation split)")
        above(self, 0, "lr")
        if self.holdout_layers and self.holdout_layers <= max(self.layers):
            raise ValueError("holdout_layers: must be bigger than every size in the fit")
        if self.params not in ("total", "non_embedding"):
            raise ValueError(f"params: must be 'total' or 'non_embedding', got {self.params!r}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup: a fraction of the steps in [0, 1), got {self.warmup}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction: must be in (0, 1], got {self.decay_fraction}")
        if self.schedule == "wsd" and self.warmup + self.decay_fraction >= 1:
            raise ValueError(
                f"decay_fraction: with schedule wsd, warmup + decay_fraction must be < 1 (the "
                f"smallest budget warms up, then cools down), got {self.warmup} + "
                f"{self.decay_fraction}"
            )
