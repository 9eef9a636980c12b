"""Config sections of the HF interop stages (`import`, `export`), `stage: score` and
`stage: embed`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from jaxllm.config.checks import at_least


@dataclass(frozen=True)
class HFConfig:
    """`hf.path`: a HF model directory to import; `hf.out_dir`: where export writes (default
    `<run_dir>/hf`); `hf.dtype`: the imported params' dtype / the exported tensors' dtype."""

    path: str = ""
    out_dir: str = ""
    dtype: Literal["float32", "bfloat16"] = "float32"
    # import: add jaxllm's chat tokens (<|system|> <|user|> <|assistant|> <|end|> <think>
    # </think>) to a tokenizer.json that lacks them (a directory with both tokenizer.model
    # and tokenizer.json then keeps the tokenizer.json), growing the embedding (and an untied
    # head) by as many rows, each the mean row plus a little seeded noise (distinct, so
    # training can tell them apart), so that sft/dpo/... can use the chat template on the
    # imported model.
    chat_tokens: bool = False
    # export: the transformers class to write an encoder checkpoint as (empty: the one its
    # heads hold, or the class it was imported from); a decoder checkpoint is refused
    architecture: Literal[
        "", "BertModel", "BertForMaskedLM", "BertForPreTraining", "BertForSequenceClassification"
    ] = ""
    # export: a quantised checkpoint (stage quantize, or a QLoRA run's int base) is refused
    # unless this is set; then its weights are dequantised (scale * int) into `hf.dtype`.
    dequantize: bool = False


@dataclass(frozen=True)
class ScoreConfig:
    """Texts to score (and/or a JSONL file with a "text" or "ids" key per line)."""

    texts: tuple[str, ...] = ()
    texts_file: str = ""
    batch_size: int = 8
    max_len: int = 512  # longer inputs are cut

    def _validate(self) -> None:
        at_least(self, 1, "batch_size")
        at_least(self, 2, "max_len")


@dataclass(frozen=True)
class EmbedConfig:
    """Texts to embed (and/or a JSONL file with a "text" key, optionally an "id", per line)
    with an encoder: `[CLS] text [SEP]`, pooled over its real tokens."""

    texts: tuple[str, ...] = ()
    texts_file: str = ""
    pooling: Literal["mean", "cls"] = "mean"  # mean: every real token's features; cls: [CLS]'s
    normalize: bool = True  # L2-normalise each vector (cosine similarity = dot product)
    batch_size: int = 32
    max_len: int = 512  # longer texts are cut (to the model's max_seq_len at most)

    def _validate(self) -> None:
        at_least(self, 1, "batch_size")
        at_least(self, 2, "max_len")
