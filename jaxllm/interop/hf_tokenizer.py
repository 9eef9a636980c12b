"""Re-exports `jaxllm.tokenizer.hf` (the `tokenizer.json` wrapper lives with the tokenizers)."""

from jaxllm.tokenizer.hf import HF_TOKENIZER_FILES, HFTokenizer, add_special_tokens, load_tokenizer

__all__ = ["HF_TOKENIZER_FILES", "HFTokenizer", "add_special_tokens", "load_tokenizer"]
