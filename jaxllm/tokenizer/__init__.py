"""Sentencepiece tokenizers with fixed special-token ids and exact encode/decode round trips."""

from jaxllm.tokenizer.tokenizer import MODEL_FILENAME, Tokenizer
from jaxllm.tokenizer.train import RESERVED, SPECIAL_BASE, train_tokenizer

__all__ = ["MODEL_FILENAME", "RESERVED", "SPECIAL_BASE", "Tokenizer", "train_tokenizer"]
