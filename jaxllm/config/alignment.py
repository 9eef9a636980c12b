"""Config sections for `stage: reward` (a Bradley-Terry reward model) and `stage: dpo`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class RewardConfig:
    """`stage: reward` — preference files and the pairwise loss.

    Files are JSONL pairs `{"prompt", "chosen", "rejected"}` or rankings `{"prompt",
    "responses", "ranking"}` (see `jaxllm/data/preference.py`); `asset:preference/...` is the
    shipped set. The model is `inputs.checkpoint` (an SFT run) plus a scalar head.
    """

    train_file: str = "asset:preference/train.jsonl"
    val_file: str = "asset:preference/val.jsonl"  # "" for none: no held-out figures
    margin: float = 0.0  # Bradley-Terry with a margin: -log sigmoid(r_c - r_r - margin)

    def _validate(self) -> None:
        if not self.train_file:
            raise ValueError("train_file: must not be empty")
        if not self.margin >= 0:
            raise ValueError(f"margin: must be >= 0, got {self.margin}")


@dataclass(frozen=True)
class DPOConfig:
    """`stage: dpo` — direct preference optimisation of `inputs.checkpoint` (the policy)
    against a frozen reference (by default the same checkpoint)."""

    train_file: str = "asset:preference/train.jsonl"
    val_file: str = "asset:preference/val.jsonl"  # "" for none: no held-out figures
    beta: float = 0.1  # strength of the implicit KL to the reference
    label_smoothing: float = 0.0  # conservative DPO: share of labels assumed flipped (sigmoid)
    loss: Literal["sigmoid", "ipo"] = "sigmoid"  # ipo uses length-averaged log-probs
    reference: str = ""  # reference checkpoint directory; "" = inputs.checkpoint
    precompute_reference: bool = False  # score the train pairs with the reference once, up front
    # the policy's log-probs without dropout (model and LoRA dropout), as the reference's
    # always are (TRL's default); false: with dropout in the training steps
    disable_dropout: bool = True

    def _validate(self) -> None:
        if not self.train_file:
            raise ValueError("train_file: must not be empty")
        if not self.beta > 0:
            raise ValueError(f"beta: must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if self.loss not in ("sigmoid", "ipo"):
            raise ValueError(f"loss: must be 'sigmoid' or 'ipo', got {self.loss!r}")
        if self.loss == "ipo" and self.label_smoothing:
            raise ValueError(
                f"label_smoothing: {self.label_smoothing} is conservative DPO (loss: sigmoid); "
                "loss 'ipo' has no label smoothing: set dpo.label_smoothing 0 or dpo.loss sigmoid"
            )
