"""OpenAI-compatible HTTP serving over the continuous-batching engine (generation/engine.py)."""

from jaxllm.serving.app import Backend, build_app
from jaxllm.serving.server import Server, free_port

__all__ = ["Backend", "Server", "build_app", "free_port"]
