"""HF interop: safetensors import/export for the llama, qwen2 and gpt2 families and BERT
(`interop/bert.py`), and a `tokenizers`-backed tokenizer for models that ship
`tokenizer.json`."""

from jaxllm.interop.hf_config import (
    FAMILIES,
    InteropError,
    family_of,
    from_model_config,
    infer_family,
    read_hf_config,
    to_model_config,
)
from jaxllm.interop.hf_weights import Spec, specs_for
from jaxllm.interop.safetensors_io import SafetensorsReader, load_hf_params, write_safetensors
from jaxllm.tokenizer.hf import HF_TOKENIZER_FILES, HFTokenizer, load_tokenizer

__all__ = [
    "FAMILIES",
    "HF_TOKENIZER_FILES",
    "HFTokenizer",
    "InteropError",
    "SafetensorsReader",
    "Spec",
    "family_of",
    "from_model_config",
    "infer_family",
    "load_hf_params",
    "load_tokenizer",
    "read_hf_config",
    "specs_for",
    "to_model_config",
    "write_safetensors",
]
