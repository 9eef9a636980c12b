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
    against a frozen reference (by default the same checkpoint), or without one (`loss:
    simpo` or `orpo`)."""

    train_file: str = "asset:preference/train.jsonl"
    val_file: str = "asset:preference/val.jsonl"  # "" for none: no held-out figures
    # reference-based kinds: strength of the implicit KL to the reference; simpo: the
    # reward scale; orpo: the odds-ratio term's weight (the paper's lambda)
    beta: float = 0.1
    # the share of labels assumed flipped: conservative DPO (sigmoid, simpo), robust DPO's and
    # EXO's eps (exo_pair: 0 means 1e-3)
    label_smoothing: float = 0.0
    # hinge: SLiC's; robust: unbiased under label noise (Chowdhury et al.); exo_pair, nca_pair,
    # apo_zero, apo_down, sppo_hard, discopop: TRL's loss types of those names (training/rl_losses.py);
    # ipo, simpo and orpo use length-averaged log-probs; simpo and orpo have no reference;
    # kto: examples marked good or bad (unpaired, or each pair's two answers) against a KL
    # reference point (trainers/kto.py)
    loss: Literal[
        "sigmoid", "hinge", "robust", "ipo", "exo_pair", "nca_pair", "apo_zero", "apo_down",
        "sppo_hard", "discopop", "simpo", "orpo", "kto",
    ] = "sigmoid"  # fmt: skip
    gamma: float = 0.5  # simpo: the target reward margin (TRL's simpo_gamma)
    discopop_tau: float = 0.05  # discopop: the temperature of its blend (TRL's and the paper's)
    # RPO (Pang et al. 2024; TRL's rpo_alpha): + alpha x the chosen answer's NLL per token,
    # with any pair loss but orpo (which has it) and kto (no pairs); 0: off
    rpo_alpha: float = 0.0
    # kto: the weights lambda_D, lambda_U of the desirable (chosen) and undesirable (rejected)
    # examples' losses (the paper keeps lambda_D n_D / (lambda_U n_U) in [1, 4/3])
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    reference: str = ""  # reference checkpoint directory; "" = inputs.checkpoint
    precompute_reference: bool = False  # score the train pairs with the reference once, up front
    # the policy's log-probs without dropout (model and LoRA dropout), as the reference's
    # always are (TRL's default); false: with dropout in the training steps
    disable_dropout: bool = True

    @property
    def reference_free(self) -> bool:
        return self.loss in ("simpo", "orpo")

    @property
    def averaged(self) -> bool:
        """The loss takes log-probs averaged over each answer's tokens (else summed)."""
        return self.loss in ("ipo", "simpo", "orpo")

    def _validate(self) -> None:
        if not self.train_file:
            raise ValueError("train_file: must not be empty")
        if not self.beta > 0:
            raise ValueError(f"beta: must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if not self.gamma >= 0:
            raise ValueError(f"gamma: must be >= 0, got {self.gamma}")
        if self.loss not in ("sigmoid", "simpo", "robust", "exo_pair") and self.label_smoothing:
            raise ValueError(
                f"label_smoothing: {self.label_smoothing} is conservative DPO (loss: sigmoid or "
                f"simpo), robust DPO's or EXO's; loss '{self.loss}' has no label smoothing: set "
                "dpo.label_smoothing 0"
            )
        if self.loss == "robust" and not self.label_smoothing:
            raise ValueError(
                "label_smoothing: loss 'robust' needs the assumed share of flipped labels, in "
                "(0, 0.5) (with 0 it is the sigmoid loss)"
            )
        own = (("desirable_weight", 1.0, "kto", "weighs KTO's examples"),
               ("undesirable_weight", 1.0, "kto", "weighs KTO's examples"),
               ("discopop_tau", 0.05, "discopop", "is DiscoPOP's temperature"))  # fmt: skip
        for key, default, loss, what in own:
            value = getattr(self, key)
            if not value > 0:
                raise ValueError(f"{key}: must be > 0, got {value}")
            if value != default and self.loss != loss:
                raise ValueError(f"{key}: {value} {what}; loss '{self.loss}' does not use it: "
                                 f"set it {default} or use loss {loss}")  # fmt: skip
        if not self.rpo_alpha >= 0:
            raise ValueError(f"rpo_alpha: must be >= 0, got {self.rpo_alpha}")
        if self.rpo_alpha and self.loss in ("orpo", "kto"):
            raise ValueError(
                f"rpo_alpha: loss '{self.loss}' "
                + ("has its own NLL term (beta weighs the other)" if self.loss == "orpo"
                   else "has no chosen answers, only marked ones")
                + "; set dpo.rpo_alpha 0"
            )  # fmt: skip
        if self.loss == "kto" and self.precompute_reference:
            raise ValueError(
                "precompute_reference: KTO's reference point is of rows that mix each batch's "
                "examples, not known before the batch; set it false"
            )
        if self.reference_free and self.reference:
            raise ValueError(
                f"reference: loss '{self.loss}' has no reference model; leave dpo.reference "
                "empty or use loss sigmoid or ipo"
            )
        if self.reference_free and self.precompute_reference:
            raise ValueError(
                f"precompute_reference: loss '{self.loss}' has no reference to precompute; "
                "set it false"
            )
