"""OpenAI's request parameters, checked, and its error shape.

A request body becomes a `Params` (or an `APIError` with OpenAI's status, type, param and
code); parameters the server does not know are ignored, as OpenAI's own clients send some
(e.g. `stream_options`). Supported: model, prompt / messages, max_tokens
(max_completion_tokens; left out: 16 for completions, as OpenAI's legacy default; for chat,
until a stop or the full context, within the server's `serve.max_tokens`), temperature,
top_p, n, stop, seed, stream, logprobs (completions: an int 0..5; chat: a bool with
top_logprobs 0..5).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_TOP_LOGPROBS = 5
MAX_STOPS = 4
DEFAULT_MAX_TOKENS = 16  # OpenAI's completions default (chat has none: `max_tokens` None)


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, type,
        )  # fmt: skip

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}  # fmt: skip


@dataclass(frozen=True)
class Params:
    """A checked request: the prompts (completions: one or more texts; chat: one
    conversation) and the sampling settings shared by every choice."""

    prompts: tuple[str, ...]
    messages: tuple[dict[str, str], ...]
    max_tokens: int | None  # None: chat's default, the room left in the context (app.py)
    temperature: float
    top_p: float
    n: int
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    logprobs: int | None  # top log-probs per token (0: the chosen token's only); None: off
    include_usage: bool


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _number(body: dict, name: str, default: float, lo: float, hi: float, *, lo_open=False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise APIError(400, f"'{name}' must be a number, got {json.dumps(value)}", param=name)
    if value > hi or value < lo or (lo_open and value == lo):
        low = f"> {lo}" if lo_open else f">= {lo}"
        raise APIError(400, f"'{name}' must be {low} and <= {hi}, got {value}", param=name)
    return value


def _int(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{name}' must be an integer, got {json.dumps(value)}", param=name)
    if not lo <= value <= hi:
        raise APIError(400, f"'{name}' must be in [{lo}, {hi}], got {value}", param=name)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, "'stop' must be a non-empty string or a list of them", param="stop")
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"'stop' takes at most {MAX_STOPS} sequences", param="stop")
    return tuple(stops)


def _logprobs(body: dict, chat: bool) -> int | None:
    if not chat:
        return _int(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    want = body.get("logprobs")
    if want is not None and not isinstance(want, bool):
        raise APIError(400, "'logprobs' must be a boolean", param="logprobs")
    top = _int(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not want:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return (top or 0) if want else None


def _content(m: Any) -> str | None:
    """A message's text: its `content` string, or its list of text parts joined (the OpenAI
    API's `[{"type": "text", "text": ...}]`); None when it is neither."""
    content = m.get("content") if isinstance(m, dict) else None
    if isinstance(content, list):
        if not all(isinstance(c, dict) and c.get("type") == "text" for c in content):
            raise APIError(400, "'messages': only text content parts are supported",
                           param="messages")  # fmt: skip
        parts = [c.get("text") for c in content]
        return "".join(parts) if all(isinstance(t, str) for t in parts) else None
    return content if isinstance(content, str) else None


def _prompts(body: dict, chat: bool) -> tuple[tuple[str, ...], tuple[dict, ...]]:
    if chat:
        messages = body.get("messages")
        texts = [_content(m) for m in messages] if isinstance(messages, list) else []
        if not texts or any(t is None for t in texts):
            raise APIError(400, "'messages' must be a non-empty list of {role, content: string}",
                           param="messages")  # fmt: skip
        # the OpenAI API's `developer` role is its newer name for `system`
        roles = ["system" if m.get("role") == "developer" else m.get("role") for m in messages]
        return (), tuple({"role": r, "content": t} for r, t in zip(roles, texts))
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise APIError(400, "'prompt' must be a string or a non-empty list of strings",
                       param="prompt")  # fmt: skip
    return tuple(prompts), ()


def parse_params(body: dict, *, chat: bool, max_tokens_limit: int, max_n: int) -> Params:
    """Checks a completions (`chat=False`) or chat completions body; raises `APIError`."""
    prompts, messages = _prompts(body, chat)
    key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    max_tokens = _int(body, key, None if chat else DEFAULT_MAX_TOKENS, 1, max_tokens_limit)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, "'seed' must be an integer", param="seed")
    return Params(
        prompts=prompts,
        messages=messages,
        max_tokens=max_tokens,
        temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
        top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)),
        n=int(_int(body, "n", 1, 1, max_n)),  # type: ignore[arg-type]
        stop=_stop(body),
        seed=seed,
        stream=stream,
        logprobs=_logprobs(body, chat),
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
    )
