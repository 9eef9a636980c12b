"""One generated choice as text: ids decoded as they come, cut at the first stop string,
handed to the request's event loop in pieces (`("delta", index, text, tokens)`, then
`("done", index, reason)`).

The engine thread calls `on_token` / `on_done` (engine.Seq callbacks). A piece never holds
the start of a stop string (the last `len(longest stop) - 1` characters wait until the
next token shows they are not one) nor half a character (byte-fallback pieces decode to
U+FFFD until the character is complete).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from jaxllm.generation.engine import Token

_PARTIAL = "\ufffd"


class Choice:
    def __init__(self, index: int, tok: Any, stops: Sequence[str], put: Callable[[tuple], None]):
        self.index, self.tok, self.stops, self.put = index, tok, tuple(stops), put
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.tokens: list[Token] = []  # not yet handed over (for log-probs)
        self.text, self.sent, self.cut = "", 0, False

    def on_token(self, token: Token) -> bool:
        """Takes one token; True when a stop string ended the text (the engine stops)."""
        self.ids.append(token.id)
        self.tokens.append(token)
        full = self.tok.decode(self.ids)
        starts = [i for s in self.stops if (i := full.find(s, max(self.sent - self.hold, 0))) >= 0]
        if starts:
            self.text, self.cut = full[: min(starts)], True
            self._send(len(self.text))
            return True
        self.text = full
        self._send(min(len(full) - self.hold, len(full.rstrip(_PARTIAL))))
        return False

    def on_done(self, reason: str) -> None:
        self._send(len(self.text), final=True)
        self.put(("done", self.index, reason))

    def _send(self, upto: int, final: bool = False) -> None:
        if upto > self.sent or (final and self.tokens):
            self.put(("delta", self.index, self.text[self.sent : upto], self.tokens))
            self.sent, self.tokens = max(upto, self.sent), []


def completion_logprobs(tok: Any, tokens: list[Token], top: int, offset: int) -> dict:
    """The completions API's `logprobs` object for `tokens` (text offsets from `offset`)."""
    strs = [tok.decode([t.id]) for t in tokens]
    offsets = []
    for s in strs:
        offsets.append(offset)
        offset += len(s)
    return {
        "tokens": strs,
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [_top(tok, t, top) for t in tokens] if top else None,
        "text_offset": offsets,
    }


def chat_logprobs(tok: Any, tokens: list[Token], top: int) -> dict:
    """The chat API's `logprobs` object: `{"content": [{token, logprob, bytes, top_logprobs}]}`."""

    def entry(token_id: int, logprob: float) -> dict:
        s = tok.decode([token_id])
        return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}

    return {
        "content": [
            {**entry(t.id, t.logprob),
             "top_logprobs": [entry(i, lp) for i, lp in zip(t.top_ids[:top], t.top_logprobs)]}
            for t in tokens
        ]
    }  # fmt: skip


def _top(tok: Any, t: Token, top: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for i, lp in zip(t.top_ids[:top], t.top_logprobs):
        out.setdefault(tok.decode([i]), lp)
    return out
