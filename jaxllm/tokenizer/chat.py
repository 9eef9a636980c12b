"""The chat template: conversations → token ids plus a loss mask over the tokens to learn.

Format (no separators; message content is taken verbatim, whitespace included)::

    <s><|system|>{system}<|end|><|user|>{user}<|end|><|assistant|>{answer}<|end|>...</s>

- An optional system message comes first; user and assistant turns follow, any number of them
  (multi-turn). `</s>` closes a conversation that ends with an assistant turn.
- `prompt_ids(messages)` is the same rendering of the messages before the last assistant turn,
  ending with `<|assistant|>`: a model continues with the answer and stops at `<|end|>`.
- The role mask is 1 on the tokens whose loss counts: each assistant turn's content and its
  closing `<|end|>`, and the final `</s>` (so the model learns to stop). A tool's answer
  inside an assistant turn, `<result>…</result>` (tags included, complete pairs only), is
  the environment's text, not the model's: mask 0, as GRPO's environment appends it
  (`trainers/episodes.py`); the `<tool>…</tool>` call before it and the answer after it
  are learnt. With `train_on_prompt=True` the mask is 1 on every token but the first `<s>`
  (nothing predicts it).
- Each piece is encoded on its own (a message; in an assistant turn also each tool result,
  encoded alone as the environment's observation is), and the tokenizer splits at special
  tokens anyway, so `render(m).ids == tok.encode(render_text(m))`: the mask boundaries are
  exact (when no user turn holds a special token's string, and the tokenizer merges no
  piece across a `<result>` / `</result>` boundary; jaxllm's trained tokenizers do not). User contents are encoded as plain text
  (`specials=False`): a special token's string there (`<pad>`, `<think>`) stays text, so a
  user cannot inject the token; the system prompt (the operator's, e.g. naming `<think>`) and
  assistant turns keep theirs. The structural strings (`<s>`, `</s>`, `<|end|>`, the role
  tokens) are refused in any message.

Records: `{"prompt": str, "response": str}` (a user turn then an assistant turn, optional
`"system"` string) or `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`.
A record that is neither, has both shapes' keys, a non-string `"system"`, or an assistant
turn with no text (empty or whitespace only) raises `DataError` naming the place given as
`where` ("file:line").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from jaxllm.errors import DataError

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_TOKEN = "<|end|>"
THINK, END_THINK = "<think>", "</think>"  # a reasoning trace inside an assistant turn
# A tool call inside an assistant turn and the environment's answer to it (plain text, not
# special tokens: `trainers/envs.py` cuts the model's turn at END_TOOL).
TOOL, END_TOOL, RESULT, END_RESULT = "<tool>", "</tool>", "<result>", "</result>"
# Strings that would break the structure if they appeared inside a message's content.
STRUCTURAL = ("<s>", "</s>", END_TOKEN, *ROLE_TOKENS.values())
_RESULT = re.compile(f"({re.escape(RESULT)}.*?{re.escape(END_RESULT)})", re.DOTALL)

Message = dict[str, str]
RecordFormat = Literal["auto", "prompt_response", "messages"]


class ChatTokenizer(Protocol):
    """What the template needs: encoding and the ids of the special pieces."""

    special_ids: dict[str, int]

    def encode(
        self, text: str, add_bos: bool = False, add_eos: bool = False, specials: bool = True
    ) -> list[int]: ...


@dataclass(frozen=True)
class Rendered:
    """Token ids of a conversation and the 0/1 loss mask over them (same length)."""

    ids: list[int]
    mask: list[int]


class ChatTemplate:
    """Renders conversations with a tokenizer that has `<s> </s> <|system|> ... <|end|>`."""

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        # a tokenizer without a BOS (an imported Qwen2's) renders conversations without `<s>`
        no_bos = getattr(tokenizer, "bos_id", 0) < 0
        missing = [s for s in STRUCTURAL if s not in tokenizer.special_ids]
        missing = [s for s in missing if not (s == "<s>" and no_bos)]
        if missing:
            raise DataError(
                f"the tokenizer has no special token(s) {', '.join(missing)}; train it with "
                "tokenizer.special_tokens including the chat tokens (the default), or for an "
                "imported HF tokenizer set hf.chat_tokens: true"
            )
        self.tok = tokenizer
        self.ids = {s: tokenizer.special_ids[s] for s in STRUCTURAL if s in tokenizer.special_ids}
        self.head = [self.ids["<s>"]] if "<s>" in self.ids else []

    def render(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = False,
        train_on_prompt: bool = False,
    ) -> Rendered:
        """Ids and loss mask of a conversation; with `add_generation_prompt`, ends `<|assistant|>`."""
        messages = check_messages(messages, "render", need_answer=not add_generation_prompt)
        ids, mask = list(self.head), [0] * len(self.head)
        context = 1 if train_on_prompt else 0  # the mask of text the model is given
        for m in messages:
            learn = 1 if (train_on_prompt or m["role"] == "assistant") else 0
            ids.append(self.ids[ROLE_TOKENS[m["role"]]])
            mask.append(context)
            # a user's text is text: a special token's string there is not that token
            plain = m["role"] == "user"
            for text, env in content_pieces(m):
                piece = self.tok.encode(text, specials=not plain)
                ids += piece
                mask += [context if env else learn] * len(piece)
            ids.append(self.ids[END_TOKEN])
            mask.append(learn)
        if add_generation_prompt:
            ids.append(self.ids[ROLE_TOKENS["assistant"]])
            mask.append(1 if train_on_prompt else 0)
        elif messages[-1]["role"] == "assistant":
            ids.append(self.ids["</s>"])
            mask.append(1)
        return Rendered(ids, mask)

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """The prompt for generating the last assistant turn (or the next one, if none ends it)."""
        return self.render(split_answer(messages)[0], add_generation_prompt=True).ids


def content_pieces(message: Message) -> list[tuple[str, bool]]:
    """A message's content as `(text, from_environment)` pieces, in order: an assistant
    turn's `<result>…</result>` spans (tags included) are the environment's; all else is
    the message's own (a user's or system's whole content, an assistant's own text)."""
    if message["role"] != "assistant":
        return [(message["content"], False)]
    parts = _RESULT.split(message["content"])  # odd indices: the captured results
    return [(p, i % 2 == 1) for i, p in enumerate(parts) if p]


def render_text(messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """The template as a string (for display; `encode` of it gives `render(...).ids`)."""
    messages = check_messages(messages, "render_text", need_answer=not add_generation_prompt)
    parts = ["<s>"] + [f"{ROLE_TOKENS[m['role']]}{m['content']}{END_TOKEN}" for m in messages]
    if add_generation_prompt:
        parts.append(ROLE_TOKENS["assistant"])
    elif messages[-1]["role"] == "assistant":
        parts.append("</s>")
    return "".join(parts)


def split_answer(messages: Sequence[Message]) -> tuple[list[Message], str]:
    """(messages before the last assistant turn, that turn's content); "" if none ends it."""
    messages = list(messages)
    if messages and messages[-1].get("role") == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, ""


def parse_record(record: Any, where: str, fmt: RecordFormat = "auto") -> list[Message]:
    """A JSONL record as a list of messages; `DataError(f"{where}: ...")` when it is malformed."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fmt == "auto":
        fmt = "messages" if "messages" in record else "prompt_response"
        extra = [k for k in ("prompt", "response", "system") if k in record]
        if fmt == "messages" and extra:
            raise DataError(
                f'{where}: has both "messages" and "{extra[0]}" (records are {{"prompt", '
                '"response", "system"} or {"messages": [...]}); keep one shape'
            )
    if fmt == "prompt_response":
        for key in ("prompt", "response"):
            if not isinstance(record.get(key), str):
                raise DataError(
                    f'{where}: expected a string "{key}" (records are {{"prompt", "response"}} '
                    'or {"messages": [...]})'
                )
        system = record.get("system")
        if "system" in record and not isinstance(system, str):
            raise DataError(f'{where}: "system" must be a string, got {type(system).__name__}')
        head = [{"role": "system", "content": system}] if "system" in record else []
        messages = [
            *head,
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]},
        ]
    else:
        messages = record.get("messages")
    out = check_messages(messages, where, need_answer=True)
    for i, m in enumerate(out):
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"{where}: message {i}: an assistant message with no text to learn")
    return out


def check_messages(messages: Any, where: str, need_answer: bool) -> list[Message]:
    """Validates roles, contents and order; returns plain {"role", "content"} dicts."""
    if not isinstance(messages, list | tuple) or not messages:
        raise DataError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}}')
    out = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise DataError(
                f'{where}: message {i} must be {{"role": one of {", ".join(ROLES)}, '
                f'"content": a string}}, got {str(m)[:60]}'
            )
        if role == "system" and i:
            raise DataError(f"{where}: message {i}: a system message may only come first")
        bad = next((s for s in STRUCTURAL if s in content), None)
        if bad:
            raise DataError(f"{where}: message {i} contains the reserved token {bad}; remove it")
        out.append({"role": role, "content": content})
    if need_answer and not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the conversation has no assistant message to learn from")
    return out
