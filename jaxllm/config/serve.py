"""Config section of `stage: serve`: the OpenAI-compatible HTTP server and its engine."""

from __future__ import annotations

from dataclasses import dataclass

from jaxllm.config.checks import at_least


@dataclass(frozen=True)
class ServeConfig:
    """Where the server listens, what it calls the model, and the engine's sizes."""

    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = ""  # the `model` id clients pass (empty: the config's name)
    slots: int = 16  # decode slots: requests decoded together in one program
    max_len: int = 0  # tokens per slot, prompt + completion (0: the model's max_seq_len)
    prefill_batch: int = 4  # prompts of one length bucket prefilled per call
    min_bucket: int = 16  # shortest prompt bucket (buckets: powers of two up to max_len)
    max_queue: int = 64  # requests waiting for a slot; more are answered 429
    # the most a request may ask for, and generate: a completions request without
    # `max_tokens` gets 16 (OpenAI's legacy default), a chat request this many or what its
    # context has room for, whichever is fewer (it stops earlier at a stop token or string)
    max_tokens: int = 256
    # a key clients must send as `Authorization: Bearer <key>`; "env:NAME" reads it from
    # the environment variable NAME; empty: no key
    api_key: str = ""
    warmup: bool = True  # compile the programs before listening

    def _validate(self) -> None:
        at_least(self, 1, "slots", "prefill_batch", "max_queue", "max_tokens", "min_bucket")
        at_least(self, 0, "max_len", note=" (0: the model's max_seq_len)")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port: must be 0..65535, got {self.port}")
