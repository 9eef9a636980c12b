"""jaxllm: the whole LLM build pipeline, JAX/Flax-native."""

__version__ = "0.1.0"
