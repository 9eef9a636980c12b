"""`stage: chat` — talk to a checkpoint: a REPL over the KV-cache sampler with the chat
template, the conversation's history, and the answer streamed to the terminal.

Commands: `/reset` (forget the history), `/system <text>` (a new system prompt, history
reset), `/quit` or `exit` (or end of input). The oldest turns are dropped when the
conversation no longer fits the model's context. The answer is sampled `chat.stream` tokens
at a time (each chunk a sampler call continuing the text so far) and printed as it grows.
The conversation is written to `chat.jsonl` in the run directory. Also `python -m
jaxllm.chat --checkpoint DIR [--set chat.temperature=0 ...]`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from typing import Any, TextIO

import jax
import yaml

from jaxllm.config import Config, resolve_path
from jaxllm.errors import ConfigError, JaxllmError
from jaxllm.generation import Sampler, sample_all
from jaxllm.interop import load_tokenizer
from jaxllm.rundir import RunDir, atomic_write_text
from jaxllm.sharding import make_mesh
from jaxllm.tokenizer.chat import END_TOKEN, ChatTemplate
from jaxllm.trainers import require_input
from jaxllm.trainers.checkpoint_model import load_checkpoint_model


class TooLong(JaxllmError):
    """A chat message that does not fit the context even alone."""


def library_prompt(name: str) -> str:
    """The system prompt of `jaxllm/assets/prompts/<name>.yaml`."""
    path = resolve_path(f"asset:prompts/{name}.yaml")
    if not path.is_file():
        known = ", ".join(p.stem for p in sorted(path.parent.glob("*.yaml")))
        raise ConfigError(f"config key 'chat.prompt': no prompt '{name}' (library: {known})")
    return str(yaml.safe_load(path.read_text(encoding="utf-8"))["system"])


class Conversation:
    """The chat template's messages and a sampler that answers the last user turn."""

    def __init__(self, graphdef, state, tok, max_len: int, cfg: Any, mesh=None, rules="dp"):
        self.state, self.tok, self.cfg, self.max_len = state, tok, cfg, max_len
        if cfg.max_new_tokens >= max_len:
            raise ConfigError(
                f"config key 'chat.max_new_tokens': {cfg.max_new_tokens} leaves no room for "
                f"the conversation in the model's context of {max_len} tokens"
            )
        self.template = ChatTemplate(tok)
        self.sampler = Sampler(graphdef, mesh=mesh, rules=rules)
        self.system = cfg.system or (library_prompt(cfg.prompt) if cfg.prompt else "")
        self.history: list[dict[str, str]] = []
        self.stop_ids = [tok.special_ids[END_TOKEN], tok.eos_id]
        self.key, self.calls = jax.random.key(0), 0

    def reset(self, system: str | None = None) -> None:
        self.history = []
        if system is not None:
            self.system = system

    def prompt_ids(self) -> list[int]:
        """The conversation ending `<|assistant|>`, oldest turns dropped until it fits;
        `TooLong` when the system prompt and the newest message alone do not."""
        room = self.max_len - self.cfg.max_new_tokens
        while True:
            sys_msg = [{"role": "system", "content": self.system}] if self.system else []
            ids = self.template.prompt_ids([*sys_msg, *self.history])
            if len(ids) <= room:
                return ids
            if len(self.history) <= 1:
                self.history = []
                raise TooLong(
                    f"(that message is {len(ids)} tokens with the system prompt; {room} fit "
                    "beside the answer's chat.max_new_tokens: not sent)"
                )
            self.history = self.history[2:]

    def prepare(self, user: str) -> list[int]:
        """Adds the user's turn; the prompt ids (`TooLong`: the turn is not kept)."""
        self.history.append({"role": "user", "content": user})
        return self.prompt_ids()

    def answer(self, user: str, emit: Callable[[str], None]) -> str:
        """`reply` to a new user turn."""
        return self.reply(self.prepare(user), emit)

    def reply(self, ids: list[int], emit: Callable[[str], None]) -> str:
        """Samples the reply `chat.stream` tokens per call, emitting the text as it grows."""
        new, shown = [], ""
        while len(new) < self.cfg.max_new_tokens:
            n = min(self.cfg.stream, self.cfg.max_new_tokens - len(new))
            self.calls += 1
            res = sample_all(
                self.sampler, self.state, [ids + new], batch_size=1,
                key_for=lambda _: jax.random.fold_in(self.key, self.calls), max_new_tokens=n,
                temperature=self.cfg.temperature, top_k=self.cfg.top_k, top_p=self.cfg.top_p,
                stop_ids=self.stop_ids,
            )  # fmt: skip
            toks, stopped = res.tokens[0], res.stopped[0]
            new += toks[:-1] if stopped else toks
            # a chunk may end inside a character (its bytes split over tokens): hold that back
            text = self.tok.decode(new).rstrip("\ufffd")
            if text.startswith(shown):
                emit(text[len(shown) :])
                shown = text
            if stopped:
                break
        text = self.tok.decode(new)
        emit(text[len(shown) :] if text.startswith(shown) else "")
        self.history.append({"role": "assistant", "content": text})
        return text


def repl(conv: Conversation, lines: Iterable[str], out: TextIO, max_turns: int = 0) -> list[dict]:
    """Reads user lines, prints streamed answers; returns the transcript."""
    transcript: list[dict] = []
    turns = 0
    out.write("chat: /reset, /system <text>, /quit\n")
    for raw in lines:
        line = raw.rstrip("\n")
        if line.strip() in ("/quit", "exit", "/exit"):
            break
        if line.strip() == "/reset":
            conv.reset()
            out.write("(history cleared)\n")
            continue
        if line.startswith("/system"):
            conv.reset(line.removeprefix("/system").strip())
            out.write("(system prompt set, history cleared)\n")
            continue
        if not line.strip():
            continue
        try:
            ids = conv.prepare(line)
        except TooLong as e:
            out.write(f"{e}\n")
            continue
        out.write("assistant: ")
        reply = conv.reply(ids, lambda s: (out.write(s), out.flush()))
        out.write("\n")
        transcript.append({"user": line, "assistant": reply, "system": conv.system})
        turns += 1
        if max_turns and turns >= max_turns:
            break
    return transcript


def run(cfg: Config, run_dir: RunDir) -> dict[str, Any]:
    ckpt = require_input(cfg, "checkpoint")
    mesh, rules = make_mesh(cfg.mesh), cfg.mesh.rules
    graphdef, state, m, meta = load_checkpoint_model(ckpt, mesh, rules)
    tok_path = cfg.inputs.tokenizer or meta.get("tokenizer", "")
    if not tok_path:
        raise ConfigError("config key 'inputs.tokenizer' is empty and the checkpoint names none")
    conv = Conversation(graphdef, state, load_tokenizer(tok_path), m.max_seq_len, cfg.chat,
                        mesh, rules)  # fmt: skip
    conv.key = jax.random.key(cfg.seed)
    transcript = repl(conv, sys.stdin, sys.stdout, cfg.chat.max_turns)
    if jax.process_index() == 0:
        text = "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in transcript)
        atomic_write_text(run_dir.path / "chat.jsonl", text)
    return {"turns": len(transcript), "outputs": {"chat": str(run_dir.path / "chat.jsonl")}}
