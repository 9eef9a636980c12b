"""AdamW with warmup + cosine/linear/constant decay, a weight-decay mask and clipping."""

from __future__ import annotations

import jax
import optax

from jaxllm.config import OptimConfig


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then decay to `lr * min_lr_ratio` at `total_steps`."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, cfg.lr, warmup, max(total_steps, warmup + 1), end_value=end
        )
    decay = (
        optax.linear_schedule(cfg.lr, end, max(total_steps - warmup, 1))
        if cfg.schedule == "linear"
        else optax.constant_schedule(cfg.lr)
    )
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def decay_mask(params):
    """Weight decay on weight matrices and embeddings only: never on biases (including the
    [heads, head_dim] q/k/v biases) or norm scales."""

    def decays(path, p) -> bool:
        names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
        name = next((n for n in reversed(names) if n and n != "value"), "")
        return p.ndim >= 2 and "bias" not in name and "scale" not in name

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(
        optax.adamw(
            lr_schedule(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts)
