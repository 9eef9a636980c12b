"""The OpenAI-compatible ASGI app (starlette): `/v1/completions`, `/v1/chat/completions`
(the chat template), `/v1/models`, `/health`, over a continuous-batching `Engine`.

Every failure is an answer, never a crash: bad JSON or parameters, an unknown model, a
prompt too long for the context → 400/404 with OpenAI's error JSON; a full queue → 429; a
missing or wrong API key (when one is set) → 401; a body too large for the context
(over `BODY_BYTES_PER_TOKEN` bytes per token of it, at least 1 MiB) → 413, unread. A client that
goes away (mid-stream, while waiting or while its answer is decoded) cancels its sequences,
which frees their slots at the next engine turn; so does a handler that ends any other way.
Prompts are tokenized off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from jaxllm.errors import DataError
from jaxllm.generation.engine import Engine, QueueFull, Seq
from jaxllm.serving.choices import Choice, chat_logprobs, completion_logprobs
from jaxllm.serving.protocol import APIError, Params, parse_json, parse_params
from jaxllm.tokenizer.chat import END_TOKEN, ChatTemplate


@dataclass
class Backend:
    """What the routes serve: the engine, its tokenizer and the served model's name."""

    engine: Engine
    tok: Any
    model_name: str
    max_tokens: int = 256
    api_key: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.created = self.created or int(time.time())
        try:
            self.template: ChatTemplate | None = ChatTemplate(self.tok)
        except DataError:
            self.template = None  # a tokenizer without the chat tokens: completions only
        end = self.tok.special_ids.get(END_TOKEN)
        # the EOS, and a HF model's other generation_config.json end ids (Llama-3-Instruct's)
        self.stop_ids = frozenset(getattr(self.tok, "eos_ids", [self.tok.eos_id]))
        # a chat answer ends at <|end|>, or at any other structural token (a role tag, <s>)
        structural = set(self.template.ids.values()) if self.template else set()
        self.chat_stop_ids = self.stop_ids | ({end} if end is not None else set()) | structural


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _check_auth(request: Request, backend: Backend) -> None:
    if not backend.api_key:
        return
    header = request.headers.get("authorization", "").encode("utf-8", "surrogateescape")
    if not secrets.compare_digest(header, f"Bearer {backend.api_key}".encode()):
        raise APIError(401, "missing or wrong API key (Authorization: Bearer <key>)",
                       code="invalid_api_key")  # fmt: skip


def _prompt_ids(backend: Backend, p: Params, chat: bool) -> list[list[int]]:
    if not chat:
        ids = [backend.tok.encode(text, add_bos=backend.tok.bos_id >= 0) for text in p.prompts]
        if not all(ids):
            raise APIError(400, "a prompt encodes to no tokens", param="prompt")
        return ids
    if backend.template is None:
        raise APIError(400, "this model's tokenizer has no chat tokens: use /v1/completions")
    try:  # the whole conversation (a last assistant turn too), then a new assistant turn
        return [backend.template.render(list(p.messages), add_generation_prompt=True).ids]
    except DataError as e:
        raise APIError(400, str(e).removeprefix("render: "), param="messages") from None


class Job:
    """A request's choices in the engine, their events on this event loop's queue."""

    def __init__(self, backend: Backend, ids: list[list[int]], p: Params, chat: bool):
        loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()

        def put(event: tuple) -> None:
            with contextlib.suppress(RuntimeError):  # a closed loop (shutdown): nobody to tell
                loop.call_soon_threadsafe(self.queue.put_nowait, event)

        # every choice draws from the request's seed: choice 0 with the seed's own key (an
        # n=1 request draws what it always did), choice k with a key derived from it
        seed = (p.seed if p.seed is not None else secrets.randbits(31)) % 2**63
        self.choices, self.seqs = [], []
        for j, prompt in enumerate(ids):
            for i in range(p.n):
                c = Choice(j * p.n + i, backend.tok, p.stop, put)
                self.choices.append(c)
                self.seqs.append(Seq(
                    prompt=prompt, max_tokens=p.max_tokens, temperature=p.temperature,
                    top_p=p.top_p, seed=seed, choice=c.index, on_token=c.on_token,
                    on_done=c.on_done,
                    stop_ids=backend.chat_stop_ids if chat else backend.stop_ids,
                ))  # fmt: skip
        self.prompt_tokens = sum(len(x) for x in ids)
        engine = backend.engine
        if len(self.seqs) > engine.max_queue:
            raise APIError(400, f"{len(self.seqs)} choices (prompts × n) are more than the "
                           f"{engine.max_queue} this server queues", param="n")  # fmt: skip
        if engine.waiting + len(self.seqs) > engine.max_queue:
            raise APIError(429, "the server is busy: too many requests waiting, retry later",
                           type="rate_limit_exceeded", code="queue_full")  # fmt: skip
        try:
            for seq in self.seqs:
                engine.submit(seq)
        except QueueFull:
            self.cancel()
            raise APIError(429, "the server is busy: too many requests waiting, retry later",
                           type="rate_limit_exceeded", code="queue_full") from None  # fmt: skip

    def cancel(self) -> None:
        for seq in self.seqs:
            seq.cancelled = True

    @property
    def completion_tokens(self) -> int:
        return sum(s.generated for s in self.seqs)

    def usage(self) -> dict[str, int]:
        done = self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}  # fmt: skip

    async def events(self, request: Request | None = None) -> AsyncIterator[tuple]:
        """Events until every choice is done; with `request`, checks for a disconnect at
        least once a second, also while tokens arrive."""
        left, loop = len(self.seqs), asyncio.get_running_loop()
        checked = loop.time()
        while left:
            try:
                event = await asyncio.wait_for(self.queue.get(), timeout=1.0)
            except TimeoutError:
                event = None
            if request is not None and loop.time() - checked >= 1.0:
                checked = loop.time()
                if await request.is_disconnected():
                    self.cancel()
                    return
            if event is not None:
                left -= event[0] == "done"
                yield event


def _finish_reason(reason: str) -> str:
    if reason in ("stop", "length"):
        return reason
    raise APIError(500, f"generation ended: {reason}", type="server_error")


def _logprobs(backend: Backend, p: Params, chat: bool, tokens: list, offset: int):
    if p.logprobs is None:
        return None
    if chat:
        return chat_logprobs(backend.tok, tokens, p.logprobs)
    return completion_logprobs(backend.tok, tokens, p.logprobs, offset)


async def _complete(backend, job: Job, p: Params, chat: bool, request: Request) -> dict:
    texts = {c.index: "" for c in job.choices}
    toks: dict[int, list] = {c.index: [] for c in job.choices}
    reasons: dict[int, str] = {}
    try:
        async for event in job.events(request):
            if event[0] == "delta":
                texts[event[1]] += event[2]
                toks[event[1]] += event[3]
            else:
                reasons[event[1]] = _finish_reason(event[2])
    finally:  # a disconnect, an error or a cancelled handler: free any slot still held
        job.cancel()
    choices = []
    for i in sorted(texts):
        lp = _logprobs(backend, p, chat, toks[i], 0)
        if chat:
            msg = {"role": "assistant", "content": texts[i]}
            choices.append({"index": i, "message": msg, "logprobs": lp,
                            "finish_reason": reasons.get(i)})  # fmt: skip
        else:
            choices.append({"index": i, "text": texts[i], "logprobs": lp,
                            "finish_reason": reasons.get(i)})  # fmt: skip
    kind = "chat.completion" if chat else "text_completion"
    return {"id": _new_id(chat), "object": kind, "created": int(time.time()),
            "model": backend.model_name, "choices": choices, "usage": job.usage()}  # fmt: skip


async def _stream(backend, job: Job, p: Params, chat: bool) -> AsyncIterator[str]:
    head = {"id": _new_id(chat), "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": backend.model_name}  # fmt: skip
    offsets = {c.index: 0 for c in job.choices}

    def chunk(i: int, text: str, tokens: list, reason: str | None, role: bool = False) -> str:
        lp = _logprobs(backend, p, chat, tokens, offsets[i]) if tokens else None
        if lp is not None and not chat:  # offsets count the token strings, as `_complete`'s
            offsets[i] += sum(len(s) for s in lp["tokens"])  # (text may be held back)
        if chat:  # OpenAI's: the role once, first; then content; the last delta is empty
            delta = {"role": "assistant", "content": ""} if role else {}
            delta.update({"content": text} if text or role else {})
            body = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}
        else:
            body = {"index": i, "text": text, "logprobs": lp, "finish_reason": reason}
        return f"data: {json.dumps({**head, 'choices': [body]}, ensure_ascii=False)}\n\n"

    try:
        if chat:
            for c in job.choices:
                yield chunk(c.index, "", [], None, role=True)
        async for event in job.events():
            if event[0] == "delta":
                yield chunk(event[1], event[2], event[3], None)
                continue
            try:
                yield chunk(event[1], "", [], _finish_reason(event[2]))
            except APIError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
                return
        if p.include_usage:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': job.usage()})}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or the stream ended): free any slot still held
        job.cancel()


BODY_BYTES_PER_TOKEN = 64  # a request body's limit per token of context (at least 1 MiB)


async def _read_body(request: Request, max_len: int) -> bytes:
    """The body, or 413 when it is larger than any prompt that fits the context could be
    (checked on Content-Length before reading, and on what arrives)."""
    limit = max(1 << 20, BODY_BYTES_PER_TOKEN * max_len)
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > limit:
        raise APIError(413, f"the request body has {size} bytes; this server takes at most "
                       f"{limit} (its context is {max_len} tokens)")  # fmt: skip
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise APIError(413, f"the request body is over {limit} bytes; this server takes "
                           f"at most that (its context is {max_len} tokens)")  # fmt: skip
    return bytes(body)


def _new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)


def build_app(backend: Backend) -> Starlette:
    """The starlette app over `backend` (the engine must be started by the caller)."""

    async def generate(request: Request, chat: bool) -> Response:
        try:
            _check_auth(request, backend)
            body = parse_json(await _read_body(request, backend.engine.max_len))
            if body.get("model") != backend.model_name:
                raise APIError(404, f"the model '{body.get('model')}' does not exist; this "
                               f"server serves '{backend.model_name}'", param="model",
                               code="model_not_found")  # fmt: skip
            engine = backend.engine
            p = parse_params(body, chat=chat, max_tokens_limit=backend.max_tokens,
                             max_n=engine.n_slots)  # fmt: skip
            ids = await run_in_threadpool(_prompt_ids, backend, p, chat)
            longest = max(len(x) for x in ids)
            if p.max_tokens is None:  # chat's default: until a stop or the context is full
                room = min(engine.max_len - longest, backend.max_tokens)
                p = replace(p, max_tokens=max(room, 1))  # no room: the error below
            if longest + p.max_tokens > engine.max_len:
                raise APIError(400, f"this model's maximum context length is {engine.max_len} "
                               f"tokens, but you requested {longest + p.max_tokens} ({longest} "
                               f"in the prompt, {p.max_tokens} to complete): shorten either",
                               param="messages" if chat else "prompt",
                               code="context_length_exceeded")  # fmt: skip
            job = Job(backend, ids, p, chat)
            if p.stream:
                return StreamingResponse(_stream(backend, job, p, chat),
                                         media_type="text/event-stream")  # fmt: skip
            return JSONResponse(await _complete(backend, job, p, chat, request))
        except APIError as e:
            return _error(e)

    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await generate(request, chat=True)

    async def models(request: Request) -> Response:
        try:
            _check_auth(request, backend)
        except APIError as e:
            return _error(e)
        card = {"id": backend.model_name, "object": "model", "created": backend.created,
                "owned_by": "jaxllm"}  # fmt: skip
        return JSONResponse({"object": "list", "data": [card]})

    async def health(request: Request) -> Response:
        e = backend.engine
        return JSONResponse({"status": "ok", "slots": e.n_slots, "busy": e.busy,
                             "waiting": e.waiting, "max_len": e.max_len})  # fmt: skip

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(APIError(exc.status_code, f"{request.method} {request.url.path}: "
                               f"{exc.detail}"))  # fmt: skip

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})
