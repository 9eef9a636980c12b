"""AdamW with warmup + cosine/linear/constant/WSD decay, a weight-decay mask and clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxllm.config import OptimConfig


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then the schedule's decay to `lr * min_lr_ratio` at `total_steps`."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return _SCHEDULES[cfg.schedule](cfg, warmup, total_steps, cfg.lr * cfg.min_lr_ratio)


def _cosine(cfg: OptimConfig, warmup: int, total: int, end: float) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, warmup, max(total, warmup + 1), end_value=end
    )


def _after_warmup(cfg: OptimConfig, warmup: int, rest: optax.Schedule) -> optax.Schedule:
    """Linear warmup over `warmup` steps, then `rest` (counted from the end of the warmup)."""
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), rest], [warmup])


def _linear(cfg: OptimConfig, warmup: int, total: int, end: float) -> optax.Schedule:
    return _after_warmup(cfg, warmup, optax.linear_schedule(cfg.lr, end, max(total - warmup, 1)))


def _constant(cfg: OptimConfig, warmup: int, total: int, end: float) -> optax.Schedule:
    return _after_warmup(cfg, warmup, optax.constant_schedule(cfg.lr))


def _wsd(cfg: OptimConfig, warmup: int, total: int, end: float) -> optax.Schedule:
    """Warmup-stable-decay: `lr` held until the last `decay_fraction` of the steps, then the
    "1 - sqrt" cooldown of Hagele et al. (2024), lr_end + (lr - lr_end)(1 - sqrt(t / T)) over
    those T steps (a 20 % cooldown, the default, matched cosine there). The decay never
    starts in the warmup: a run too short for both cools down over the steps left after it."""
    decay = min(max(round(cfg.decay_fraction * total), 1), max(total - warmup, 1))
    stable = max(total - decay, warmup) - warmup  # steps at lr after the warmup

    def cooldown(step):
        t = jnp.clip((step - stable) / decay, 0.0, 1.0)
        return end + (cfg.lr - end) * (1.0 - jnp.sqrt(t))

    return _after_warmup(cfg, warmup, cooldown)


_SCHEDULES = {"cosine": _cosine, "linear": _linear, "constant": _constant, "wsd": _wsd}


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
