"""AdamW or Muon with warmup + cosine/linear/constant/WSD decay, a weight-decay mask and
clipping."""

from __future__ import annotations

import math

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
        name = _leaf_name(path)
        return p.ndim >= 2 and "bias" not in name and "scale" not in name

    return jax.tree_util.tree_map_with_path(decays, params)


def _leaf_name(path) -> str:
    """The parameter's own name: the last key of its path other than nnx's `value`."""
    names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
    return next((n for n in reversed(names) if n and n != "value"), "")


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(_OPTIMIZERS[cfg.name](cfg, lr_schedule(cfg, total_steps)))
    return optax.chain(*parts)


def _adamw(cfg: OptimConfig, lr: optax.Schedule) -> optax.GradientTransformation:
    return optax.adamw(
        lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask
    )


# Muon's matrices, by parameter name: (reduction axes, output axes) of x @ W, counted from the
# end, so a scanned stack's leading layer axis is a batch axis (each layer orthogonalised
# alone). q/k/v are [d, heads, head_dim], o [heads, head_dim, d], the MLP's [in, out].
_MUON_AXES = {
    **dict.fromkeys(("q", "k", "v"), ((-3,), (-2, -1))),
    "o": ((-3, -2), (-1,)),
    **dict.fromkeys(("up", "gate", "down"), ((-2,), (-1,))),
}
MUON_BETA, MUON_RMS = 0.95, 0.2  # momentum; the update RMS matched to AdamW's (Moonlight)


def _muon_dims(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, p: optax.contrib.MuonDimensionNumbers(*_MUON_AXES[_leaf_name(path)]), params
    )


def _muon_label(path, p) -> str:
    axes = _MUON_AXES.get(_leaf_name(path))
    return "muon" if axes and p.ndim >= len(axes[0]) + len(axes[1]) else "adam"


def _muon_rms(updates, state, params=None):
    """Scales each orthogonalised update by 0.2 sqrt(max(fan_in, fan_out)): an RMS like
    AdamW's, so Muon takes AdamW's learning rate and weight decay (Liu et al. 2025)."""

    def scale(path, u):
        reduce, out = _MUON_AXES[_leaf_name(path)]
        fans = (math.prod(u.shape[a] for a in reduce), math.prod(u.shape[a] for a in out))
        return u * (MUON_RMS * math.sqrt(max(fans)))

    return jax.tree_util.tree_map_with_path(scale, updates), state


def _muon(cfg: OptimConfig, lr: optax.Schedule) -> optax.GradientTransformation:
    """Muon (Jordan et al. 2024) on the attention and MLP matrices: Nesterov momentum
    (beta 0.95), orthogonalised by five Newton-Schulz steps per matrix, scaled to AdamW's RMS,
    decoupled weight decay; AdamW (the config's betas, eps and decay mask) on everything else:
    embeddings, output layer, norms, biases, PEFT variables."""
    muon = optax.chain(
        optax.contrib.scale_by_muon(beta=MUON_BETA, weight_dimension_numbers=_muon_dims),
        optax.GradientTransformation(lambda params: optax.EmptyState(), _muon_rms),
        optax.add_decayed_weights(cfg.weight_decay),
        optax.scale_by_learning_rate(lr),
    )
    labels = lambda params: jax.tree_util.tree_map_with_path(_muon_label, params)  # noqa: E731
    return optax.partition({"muon": muon, "adam": _adamw(cfg, lr)}, labels)


_OPTIMIZERS = {"adamw": _adamw, "muon": _muon}
