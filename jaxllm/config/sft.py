"""Config section for `stage: sft` (supervised fine-tuning on chat records)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class SFTConfig:
    """`stage: sft` — the chat data and how it is trained and scored.

    Files are JSONL of `{"prompt", "response"}` or `{"messages": [...]}` records (see
    `jaxllm/tokenizer/chat.py`); `asset:sft/train.jsonl` names the shipped set.
    """

    train_file: str = "asset:sft/train.jsonl"
    val_file: str = "asset:sft/val.jsonl"  # "" for none: no validation loss or exact match
    format: Literal["auto", "prompt_response", "messages"] = "auto"  # auto: by the keys present
    # keep only the records whose "task" is one of these (train and val; empty: all records),
    # e.g. [service] for a second, domain-only pass over a mixed file
    tasks: tuple[str, ...] = ()
    train_on_prompt: bool = False  # also learn the system/user tokens (default: answers only)
    packing: bool = True  # whole conversations share rows (best-fit); false: one per padded row
    # `<think>…</think>` reasoning traces in answers: keep (learn trace + answer), mask (trace
    # in the input, loss on the answer only), drop (remove traces: the answers-only baseline).
    # Exact match always compares the final answers (the text after the last </think>).
    trace: Literal["keep", "mask", "drop"] = "keep"
    eval_max_new_tokens: int = 32  # greedy answer length for exact match
    eval_examples: int = 64  # held-out prompts scored by exact match (0: none)
    eval_batch_size: int = 32  # prompts generated together

    def _validate(self) -> None:
        if not self.train_file:
            raise ValueError("train_file: must not be empty")
        if self.eval_max_new_tokens < 1:
            raise ValueError(f"eval_max_new_tokens: must be >= 1, got {self.eval_max_new_tokens}")
        if self.eval_examples < 0:
            raise ValueError(f"eval_examples: must be >= 0, got {self.eval_examples}")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size: must be >= 1, got {self.eval_batch_size}")
