"""Parameter-efficient fine-tuning methods, looked up by name in one table (`PEFT_METHODS`).

Each method is a variable type of its own (what trains, and all a checkpoint of the
method holds besides a stage's new head), a function that attaches it to a model in place,
one that takes it off again (LoRA merges into the weights, keeping the outputs; the others
can only be stripped, giving the base back), a parameter count by its published formula,
and, for methods trained through a reparameterisation (prefix MLP, P-tuning's encoder),
a `fold` that replaces it by the values it produces.

Methods attach to every backbone (a `Decoder` or `Encoder`: a module with `blocks`) of a
model, so a reward model's `decoder` or a classifier's `encoder` is adapted in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
from flax import nnx

from jaxllm.config import ModelConfig, PeftConfig
from jaxllm.models.layers import ParamKeys
from jaxllm.models.peft.adapter import AdapterParam, adapter_count, apply_adapters, strip_adapters
from jaxllm.models.peft.lora import TARGETABLE, apply_lora, lora_targets, merge_lora
from jaxllm.models.peft.prefix import PrefixParam, apply_prefix, prefix_count
from jaxllm.models.peft.prompt import PromptParam, apply_prompt, prompt_count
from jaxllm.models.peft.tokens import TokenParam, apply_tokens, tokens_count
from jaxllm.models.scan import is_stacked

Backbones = list[tuple[str, nnx.Module]]


@dataclass(frozen=True)
class PeftMethod:
    """One PEFT method: see the module docstring."""

    name: str
    variable: type[nnx.Param]
    apply: Callable[[nnx.Module, PeftConfig, nnx.Rngs | ParamKeys], list[str]]
    merge_or_strip: Callable[[nnx.Module], int]
    mergeable: bool  # merge_or_strip keeps the outputs (plain weights, HF export)
    count: Callable[[nnx.Module, PeftConfig], int]
    # whether it trains through a reparameterisation that `fold_reparameterisations` folds
    reparameterised: Callable[[PeftConfig], bool] = lambda cfg: False


def backbones(model: nnx.Module) -> Backbones:
    """(path prefix, module) of every decoder/encoder in `model` (`""` for the model)."""
    found = []
    for path, module in nnx.iter_modules(model):
        if hasattr(module, "blocks") and hasattr(module, "prompt") and hasattr(module, "cfg"):
            found.append(("".join(f"{p}." for p in path), module))
    return sorted(found, key=lambda x: x[0])


def _on_backbones(fn: Callable[[Backbones, PeftConfig, nnx.Rngs | ParamKeys], list[str]]):
    return lambda model, cfg, rngs: fn(backbones(model), cfg, rngs)


def _strip(attribute: str) -> Callable[[nnx.Module], int]:
    def strip(model: nnx.Module) -> int:
        found = [m for _, m in backbones(model) if getattr(m, attribute) is not None]
        for m in found:
            setattr(m, attribute, None)
        return len(found)

    return strip


def _lora_count(model: nnx.Module, cfg: PeftConfig) -> int:
    """rank·(fan_in + fan_out) per adapted weight (per layer of a stacked one), plus the
    trainable tokens' K·D (and D·K for an untied head)."""
    total = tokens_count(model)
    for _, module, name in lora_targets(model, cfg.targets):
        w = getattr(module, name)
        k = 1 if is_stacked(w) else 0
        n_in = TARGETABLE[name]
        fan_in, fan_out = math.prod(w.shape[k : k + n_in]), math.prod(w.shape[k + n_in :])
        total += math.prod(w.shape[:k]) * cfg.rank * (fan_in + fan_out)
    return total


def _per_backbone(fn: Callable[[ModelConfig, PeftConfig], int]) -> Callable:
    """A count from each backbone's model config, summed."""
    return lambda model, cfg: sum(fn(m.cfg, cfg) for _, m in backbones(model))


def _adapter_count(m: ModelConfig, cfg: PeftConfig) -> int:
    return adapter_count(m.n_layers, m.d_model, cfg.adapter_dim)


def _prefix_count(m: ModelConfig, cfg: PeftConfig) -> int:
    return prefix_count(m.n_layers, m.kv_heads * m.head_size, m.d_model, cfg)


def _prompt_count(m: ModelConfig, cfg: PeftConfig) -> int:
    return prompt_count(m.d_model, cfg)


PEFT_METHODS: dict[str, PeftMethod] = {
    "lora": PeftMethod("lora", nnx.LoRAParam, apply_lora, merge_lora, True, _lora_count),
    "adapter": PeftMethod(
        "adapter", AdapterParam, _on_backbones(apply_adapters), strip_adapters, False,
        _per_backbone(_adapter_count),
    ),
    "prefix": PeftMethod(
        "prefix", PrefixParam, _on_backbones(apply_prefix), _strip("prefix"), False,
        _per_backbone(_prefix_count), lambda cfg: cfg.prefix_projection,
    ),
    "prompt": PeftMethod(
        "prompt", PromptParam, _on_backbones(apply_prompt), _strip("prompt"), False,
        _per_backbone(_prompt_count), lambda cfg: cfg.prompt_encoder != "none",
    ),
}  # fmt: skip


def peft_method(name: str) -> PeftMethod:
    if name not in PEFT_METHODS:
        raise ValueError(f"peft.method: {name!r} is not one of {['none', *PEFT_METHODS]}")
    return PEFT_METHODS[name]


def apply_peft(
    model: nnx.Module,
    cfg: PeftConfig,
    rngs: nnx.Rngs | ParamKeys,
    token_ids: Sequence[int] = (),
) -> list[str]:
    """Attaches `cfg.method` in place (call under `nnx.use_eager_sharding(False)`), and
    trainable tokens for `token_ids` (`cfg.trainable_tokens` resolved by the caller's
    tokenizer, one id each); returns what it attached. Errors (ValueError) when it finds
    nothing to attach to."""
    if len(token_ids) != len(cfg.trainable_tokens):
        raise ValueError(
            f"config key 'peft.trainable_tokens': {len(cfg.trainable_tokens)} tokens, "
            f"{len(token_ids)} ids given (resolve them with the run's tokenizer)"
        )
    paths = peft_method(cfg.method).apply(model, cfg, rngs)
    if not paths:
        raise ValueError(f"peft.method {cfg.method}: the model has no decoder or encoder")
    if token_ids:
        paths += apply_tokens(backbones(model), list(token_ids))
    return paths


def methods_in(tree: nnx.Module | nnx.State) -> list[PeftMethod]:
    """The methods whose variables a model or state holds."""
    state = tree if isinstance(tree, nnx.State) else nnx.state(tree)
    return [
        m for m in PEFT_METHODS.values() if jax.tree.leaves(nnx.filter_state(state, m.variable))
    ]


def fold_reparameterisations(model: nnx.Module) -> int:
    """Replaces training-only reparameterisations (prefix MLP, prompt encoder) by the
    values they produce, in place; returns how many."""
    folded = 0
    for _, m in backbones(model):
        folded += sum(bool(x.fold()) for x in (m.prefix, m.prompt) if x is not None)
    return folded


def merge_peft(model: nnx.Module) -> list[str]:
    """Merges every mergeable method (LoRA) into the weights, in place; returns the names
    of the methods left on the model (they cannot be merged)."""
    left = []
    for method in methods_in(model):
        if method.mergeable:
            method.merge_or_strip(model)
        else:
            left.append(method.name)
    return left


__all__ = [
    "PEFT_METHODS",
    "AdapterParam",
    "PeftMethod",
    "PrefixParam",
    "PromptParam",
    "TokenParam",
    "apply_peft",
    "backbones",
    "fold_reparameterisations",
    "merge_peft",
    "methods_in",
    "peft_method",
]
