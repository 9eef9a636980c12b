"""Generation with a KV cache: jitted prefill + compiled decode loop, and sampling filters."""

from jaxllm.generation.batched import generate_text, response_texts, sample_all
from jaxllm.generation.sampler import Sampler, SampleResult
from jaxllm.generation.sampling import sample_logits, token_logprobs

__all__ = [
    "SampleResult",
    "Sampler",
    "generate_text",
    "response_texts",
    "sample_all",
    "sample_logits",
    "token_logprobs",
]
