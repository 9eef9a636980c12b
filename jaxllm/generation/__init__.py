"""Generation with a KV cache: jitted prefill + compiled decode loop, and sampling filters."""

from jaxllm.generation.sampler import Sampler, SampleResult, generate_text
from jaxllm.generation.sampling import sample_logits, token_logprobs

__all__ = ["SampleResult", "Sampler", "generate_text", "sample_logits", "token_logprobs"]
