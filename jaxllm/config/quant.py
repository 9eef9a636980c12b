"""Config section `quantize:` — weight-only quantisation of a decoder's dense weights, for
generate, score, eval (and any caller of `jaxllm.models.quant.quantize_state`), for
`stage: quantize` (which writes a quantised checkpoint) and as QLoRA's frozen base under
`peft.method: lora`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

# Every dense weight of a block and an untied output head (paths like "blocks.3.attn.q",
# "blocks.attn.q" with model.scan_layers, "head"). The embedding table stays float.
DEFAULT_SCOPE = (r"attn\.(q|k|v|o)$", r"mlp\.(up|gate|down)$", r"(^|\.)head$")
QUANT_METHODS = ("none", "int8", "int4")


@dataclass(frozen=True)
class QuantizeConfig:
    """`int8`: one float32 scale per output channel (symmetric absmax over the whole input
    dimension). `int4`: one scale per output channel and per group of `group_size`
    consecutive input features (the last input axis; a smaller axis is one group), as in
    GPTQ/AWQ's grouped int4. Activations stay in the model's compute dtype: a weight is
    dequantised at use. `scope`: regular expressions (`re.search`) over module paths,
    like `peft.targets`."""

    method: Literal["none", "int8", "int4"] = "none"
    group_size: int = 128
    scope: tuple[str, ...] = DEFAULT_SCOPE

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def _validate(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"group_size: must be >= 1, got {self.group_size}")
        if not self.scope:
            raise ValueError("scope: give at least one module-path pattern")
        for pattern in self.scope:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"scope: {pattern!r} is not a regular expression ({e})") from None
