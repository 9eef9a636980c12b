"""Config section `peft:` — parameter-efficient fine-tuning, for any stage that starts from a
checkpoint (sft, reward, dpo, ppo, grpo, distill)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

# Every dense weight of a block (module paths look like "blocks.3.attn.q", "blocks.3.mlp.up";
# "blocks.attn.q" with model.scan_layers, whose adapters cover every layer at once).
DEFAULT_TARGETS = (r"attn\.(q|k|v|o)$", r"mlp\.(up|gate|down)$")


@dataclass(frozen=True)
class PeftConfig:
    """`method: lora` adds low-rank adapters `A [in, rank]`, `B [rank, out]` (B starts at zero,
    so training starts from the base model exactly) to every weight whose module path matches
    one of `targets` (regular expressions, `re.search`); the output becomes
    `x W + (alpha / rank) * dropout(x) A B`. Only adapters (and a stage's new heads) train;
    checkpoints hold only them, and name the base checkpoint they apply to."""

    method: Literal["none", "lora"] = "none"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapters' input, training only
    targets: tuple[str, ...] = DEFAULT_TARGETS

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def _validate(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank: must be >= 1, got {self.rank}")
        if self.alpha <= 0:
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
