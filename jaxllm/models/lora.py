"""LoRA moved to `jaxllm.models.peft.lora` (one module per PEFT method); this name stays so
that existing imports keep working."""

from jaxllm.models.peft.lora import (
    TARGETABLE,
    apply_lora,
    has_lora,
    lora_targets,
    merge_lora,
)

__all__ = ["TARGETABLE", "apply_lora", "has_lora", "lora_targets", "merge_lora"]
