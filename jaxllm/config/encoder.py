"""Config sections for the encoder stages: `stage: mlm` (BERT's masked-LM + next-sentence
pretraining) and `stage: classify` (fine-tuning an encoder for text classification)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from jaxllm.config.checks import above, at_least


@dataclass(frozen=True)
class MLMConfig:
    """`stage: mlm` — how sentence pairs are built and masked (`jaxllm/data/mlm.py`).

    Pairs come from the cleaned corpus (`inputs.data_dir`): sentence B is the true next run
    of sentences half of the time, a run from another document otherwise (`nsp: false`:
    single-segment rows, no NSP). Of the non-special
    tokens, `mask_prob` are chosen for prediction; of those 80 % become `[MASK]`, 10 % a
    random token and 10 % stay as they are.
    """

    mask_prob: float = 0.15  # share of the (non-special) tokens of a pair chosen to predict
    whole_word: bool = False  # choose whole words: a token with its `##` continuations
    short_seq_prob: float = 0.1  # BERT: this share of pairs aims at a shorter random length
    # chosen positions per row, the static M of the batch (0: ceil(mask_prob * seq_len) + 1)
    max_predictions: int = 0
    # next-sentence prediction. false: RoBERTa's DOC-SENTENCES rows instead of pairs, each
    # `[CLS] consecutive sentences of one document [SEP]` (every sentence used, a one-sentence
    # document included), the masked-LM loss alone; the pooler then stays as initialised
    nsp: bool = True
    # mlm: BERT's masked-LM (+ NSP). electra: replaced-token detection (Clark et al. 2020): a
    # small generator fills the chosen positions and the encoder learns from every token
    # whether it was replaced; needs nsp: false
    objective: Literal["mlm", "electra"] = "mlm"
    generator_layers: int = 1  # electra: the generator's depth (its width is the encoder's)
    generator_d_ff: int = 0  # electra: the generator's MLP width (0: a quarter of the encoder's)
    disc_weight: float = 50.0  # electra: the replaced-token loss's weight (the paper's 50)

    def _validate(self) -> None:
        if self.objective == "electra" and self.nsp:
            raise ValueError("objective: electra has no next-sentence task; set nsp: false")
        at_least(self, 1, "generator_layers")
        at_least(self, 0, "generator_d_ff", note=" (0: a quarter of the encoder's d_ff)")
        above(self, 0, "disc_weight")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob: must be in (0, 1), got {self.mask_prob}")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise ValueError(f"short_seq_prob: must be in [0, 1], got {self.short_seq_prob}")
        if self.max_predictions < 0:
            raise ValueError(f"max_predictions: must be >= 0, got {self.max_predictions}")


@dataclass(frozen=True)
class ClassifyConfig:
    """`stage: classify` — labelled JSONL files (`{"text", "label"}`, or sentence pairs
    `{"text", "text_pair", "label"}`; `.gz` ok) and how the classifier starts.

    `labels` is the label set in order (logit i is label i); empty: the sorted labels of
    `train_file`. A pair file is one whose first training record has `text_pair`; then every
    record of every file must have it.
    """

    train_file: str = "asset:sentiment/train.jsonl.gz"
    val_file: str = "asset:sentiment/val.jsonl.gz"  # "" for none
    test_file: str = "asset:sentiment/test.jsonl.gz"  # "" for none
    labels: tuple[str, ...] = ("negative", "positive")
    # checkpoint: the encoder of `inputs.checkpoint` (its MLM/NSP heads dropped); random: the
    # same encoder shape (the checkpoint's model config, else `model:`) from a fresh init
    init: Literal["checkpoint", "random"] = "checkpoint"
    dropout: float = 0.1  # the encoder's and the head's dropout while fine-tuning
    # what the head reads: cls, BERT's pooler over `[CLS]` (trained by NSP in pretraining);
    # mean, the mean of the final features over the real tokens (the pooler unused)
    pooling: Literal["cls", "mean"] = "cls"

    def _validate(self) -> None:
        if not self.train_file:
            raise ValueError("train_file: must not be empty")
        if len(set(self.labels)) != len(self.labels) or "" in self.labels:
            raise ValueError(f"labels: must be distinct and non-empty, got {list(self.labels)}")
        if len(self.labels) == 1:
            raise ValueError("labels: a classifier needs at least two labels")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
