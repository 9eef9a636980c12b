"""Config section `peft:` — parameter-efficient fine-tuning, for any stage that starts from a
checkpoint (sft, reward, dpo, distill, grpo; ppo with lora only) and for stage classify (its head always trains)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

# Every dense weight of a block (module paths look like "blocks.3.attn.q", "blocks.3.mlp.up";
# "blocks.attn.q" with model.scan_layers, whose adapters cover every layer at once).
DEFAULT_TARGETS = (r"attn\.(q|k|v|o)$", r"mlp\.(up|gate|down)$")
METHODS = ("none", "lora", "adapter", "prefix", "prompt")


@dataclass(frozen=True)
class PeftConfig:
    """What trains on top of a frozen base (models/peft, one table of methods).

    `lora` adds low-rank adapters `A [in, rank]`, `B [rank, out]` (B starts at zero) to every
    weight whose module path matches one of `targets` (regular expressions, `re.search`);
    the output becomes `x W + (alpha / rank) * dropout(x) A B`. `adapter`: Houlsby
    bottlenecks `h + up(gelu(down(h)))` of width `adapter_dim` after the attention and MLP
    sublayers (up starts at zero). `prefix`: `num_virtual_tokens` trainable keys/values per
    layer seen by every query (optionally produced by an MLP, `prefix_projection`, of width
    `prefix_hidden`, folded into plain prefixes when the run saves its last step, stops early
    or keeps its best). `prompt`: `num_virtual_tokens` trainable input embeddings before the
    tokens (`prompt_encoder: mlp`: P-tuning's MLP of width `prompt_hidden` in front, folded
    the same way). Only the method's variables (and a stage's new heads) train; checkpoints
    hold only them, and name the base checkpoint they apply to. Widths of 0 mean the model's
    `d_model`.

    `trainable_tokens` (lora only): token strings (e.g. chat tokens added by `hf.chat_tokens`)
    whose embedding rows train as a delta [K, D] (zeros at start), resolved to ids with the
    run's tokenizer; the output layer uses the same delta when tied, its own [D, K] for an
    untied head (models/peft/tokens.py). LoRA alone never changes embedding rows."""

    method: Literal["none", "lora", "adapter", "prefix", "prompt"] = "none"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # on the LoRA adapters' input, training only
    targets: tuple[str, ...] = DEFAULT_TARGETS
    adapter_dim: int = 64
    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    prefix_hidden: int = 0
    prompt_encoder: Literal["none", "mlp"] = "none"
    prompt_hidden: int = 0
    trainable_tokens: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def _validate(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank: must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"alpha: must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("targets: give at least one module-path pattern")
        for pattern in self.targets:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(
                    f"targets: {pattern!r} is not a regular expression ({e})"
                ) from None
        for key in ("adapter_dim", "num_virtual_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("prefix_hidden", "prompt_hidden"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: must be >= 0 (0: the model's d_model)")
        if self.trainable_tokens and self.method != "lora":
            raise ValueError(
                f"trainable_tokens: works with method lora only (the tokens' delta merges "
                f"into the embedding as LoRA does), got method {self.method}"
            )
        for t in self.trainable_tokens:
            if not isinstance(t, str) or not t:
                raise ValueError(f"trainable_tokens: {t!r} is not a token string")
        dup = sorted({t for t in self.trainable_tokens if self.trainable_tokens.count(t) > 1})
        if dup:
            raise ValueError(f"trainable_tokens: {dup} listed twice")
