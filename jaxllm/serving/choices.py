"""One generated choice as text: ids decoded as they come, cut at the first stop string,
handed to the request's event loop in pieces (`("delta", index, text, tokens)`, then
`("done", index, reason)`).

The engine thread calls `on_token` / `on_done` (engine.Seq callbacks). A piece never holds
the start of a stop string (the last `len(longest stop) - 1` characters wait until the
next token shows they are not one) nor half a character (byte-fallback pieces decode to
U+FFFD until the character is complete).
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from jaxllm.generation.engine import Token

_PARTIAL = "\ufffd"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a byte-fallback piece


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
        raw = token_bytes(tok, token_id)
        return {"token": tok.decode([token_id]), "logprob": logprob, "bytes": list(raw)}

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


def token_bytes(tok: Any, token_id: int) -> bytes:
    """A token's own bytes (the chat API's `bytes`: joined, they rebuild a character split
    over tokens). Sentencepiece-style pieces (jaxllm's `Tokenizer`, HF Metaspace /
    ByteFallback): `<0xNN>` is that byte, any other piece its UTF-8 with "▁" as a space;
    HF byte-level BPE (GPT-2, Llama 3, Qwen2): each character of the piece stands for one
    byte (GPT-2's byte-to-unicode table). Special and added tokens, and tokenizers of any
    other kind (WordPiece), give the UTF-8 of their decoded text."""
    kind, whole = _piece_kind(tok)
    if kind == "text" or token_id in whole:
        return tok.decode([token_id]).encode("utf-8")
    piece = tok.id_to_piece(token_id)
    if kind == "bytelevel":
        if all(c in _UNICODE_TO_BYTE for c in piece):
            return bytes(_UNICODE_TO_BYTE[c] for c in piece)
        return tok.decode([token_id]).encode("utf-8")
    if m := _BYTE_PIECE.fullmatch(piece):
        return bytes([int(m.group(1), 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: printable Latin-1 bytes stand for themselves, the other bytes for the
    characters from U+0100 on, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in _gpt2_bytes_to_unicode().items()}
_KINDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _piece_kind(tok: Any) -> tuple[str, frozenset[int]]:
    """("spm" | "bytelevel" | "text", ids whose bytes are their decoded text), per tokenizer."""
    if tok in _KINDS:
        return _KINDS[tok]
    whole = set(getattr(tok, "special_ids", {}).values())
    if getattr(tok, "unk_id", -1) >= 0:
        whole.add(tok.unk_id)
    hf = getattr(tok, "_tok", None)  # HFTokenizer: the `tokenizers` library's object
    if hf is None:
        kind = "spm" if hasattr(tok, "is_byte") else "text"
    else:
        whole |= set(hf.get_added_tokens_decoder())  # added tokens: their content is text
        types = set(_types(json.loads(hf.to_str()).get("decoder")))
        kind = ("bytelevel" if "ByteLevel" in types
                else "spm" if types & {"Metaspace", "ByteFallback"} else "text")  # fmt: skip
    _KINDS[tok] = kind, frozenset(whole)
    return _KINDS[tok]


def _types(node: Any):
    """Every "type" in a tokenizer.json section (a Sequence decoder nests its decoders)."""
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            yield node["type"]
        for value in node.values():
            yield from _types(value)
    elif isinstance(node, list):
        for value in node:
            yield from _types(value)
