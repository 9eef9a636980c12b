"""Config section for `stage: distill` (knowledge distillation, white-box and black-box)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class DistillConfig:
    """`stage: distill` — a teacher (`inputs.checkpoint`) teaches a student.

    `mode: white_box`: the student (a fresh model from `model:`, or `student_checkpoint`)
    trains on the pretraining data (`inputs.data_dir`) with
    `(1 - alpha) * CE + alpha * KL(teacher, student at temperature)`; the teacher's forward
    runs inside the same jitted step, without gradient. `baseline: true` also trains the same
    student from the same init on the same batches with alpha = 0 and reports both.

    `mode: black_box`: the teacher answers the prompts of `prompts_file` (and `val_prompts_file`)
    with the sampler and writes `{"prompt", "response"}` SFT records, handed on as outputs
    `sft_data` / `sft_val_data` to a following `stage: sft` (the student's fine-tuning).
    Generation stops at any structural token; answers that hit `max_new_tokens` unfinished
    are dropped (unless `keep_truncated`), and prompts with earlier assistant turns refused.
    """

    mode: Literal["white_box", "black_box"] = "white_box"
    # white-box
    alpha: float = 0.5  # weight of the distillation term (0: data alone, 1: teacher alone)
    temperature: float = 1.0  # softens both distributions; the KL is scaled by T^2
    kind: Literal["forward", "reverse"] = "forward"  # KL(teacher||student) or KL(student||teacher)
    baseline: bool = True  # also train the student on the data alone (same init, same batches)
    student_checkpoint: str = ""  # start the student from here instead of a fresh `model:`
    # black-box
    prompts_file: str = "asset:sft/train.jsonl"  # prompts the teacher answers (SFT or prompt rows)
    val_prompts_file: str = "asset:sft/val.jsonl"  # "" for none: held-out teacher answers
    max_prompts: int = 0  # answer at most this many train prompts (0: all)
    max_new_tokens: int = 48  # answer length limit
    sample_temperature: float = 0.0  # 0: greedy answers
    top_p: float = 1.0
    batch_size: int = 64  # prompts generated together
    # keep answers cut off at max_new_tokens (unfinished) as SFT targets; false: drop them
    keep_truncated: bool = False

    def _validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha: must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")
        if self.max_prompts < 0:
            raise ValueError(f"max_prompts: must be >= 0, got {self.max_prompts}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if not self.sample_temperature >= 0:
            raise ValueError(f"sample_temperature: must be >= 0, got {self.sample_temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.mode == "black_box" and not self.prompts_file:
            raise ValueError("prompts_file: must not be empty in mode black_box")
