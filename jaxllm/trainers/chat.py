"""`stage: chat` — talk to a checkpoint: a REPL over the KV-cache sampler with the chat
template, the conversation's history, and the answer streamed to the terminal.

Commands: `/reset` (forget the history), `/system <text>` (a new system prompt, history
reset), `/quit` or `exit` (or end of input, or Ctrl-C at the input). The oldest turns are
dropped when the conversation no longer fits the model's context; a message that does not fit
even alone is not sent (the history stays). The answer is sampled `chat.stream` tokens at a
time (each chunk a sampler call continuing the text so far) and printed as it grows; it ends
at `<|end|>`, `</s>` or any other structural token (a role token, `<s>`: not kept), and Ctrl-C
while it streams cancels it (the turn is dropped, the chat goes on). Input bytes that are not
text in the terminal's encoding read as U+FFFD. The conversation is written to `chat.jsonl` in
the run directory. Also `python -m jaxllm.chat --checkpoint DIR [--set chat.temperature=0 ...]`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from typing import Any, TextIO

import jax
import yaml

from jaxllm.config import Config, resolve_path
from jaxllm.errors import ConfigError, DataError, JaxllmError
from jaxllm.generation import Sampler, sample_all
from jaxllm.interop import load_tokenizer
from jaxllm.rundir import RunDir, atomic_write_text
from jaxllm.sharding import make_mesh
from jaxllm.tokenizer.chat import STRUCTURAL, ChatTemplate
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
        bad = next((s for s in STRUCTURAL if s in self.system), None)
        if bad:
            key = "chat.system" if cfg.system else f"chat.prompt ({cfg.prompt})"
            raise ConfigError(f"config key '{key}': the system prompt holds the token {bad}")
        self.history: list[dict[str, str]] = []
        # every structural token ends the answer: a role token in a reply would be refused by
        # the template on the next turn (`<|end|>` and `</s>` are the proper ends)
        # the answer's end, a HF model's other generation_config.json end ids (as generate)
        ends = {*self.template.ids.values(), *getattr(tok, "eos_ids", [tok.eos_id])}
        self.stop_ids = sorted(i for i in ends if i >= 0)
        self.key, self.calls = jax.random.key(0), 0

    def reset(self, system: str | None = None) -> None:
        self.history = []
        if system is not None:
            self.system = system

    def prompt_ids(self) -> list[int]:
        """The conversation ending `<|assistant|>`, oldest turns dropped until it fits;
        `TooLong` when the system prompt and the newest message alone do not (the history
        is then left as it was)."""
        room, history = self.max_len - self.cfg.max_new_tokens, self.history
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        while True:
            ids = self.template.prompt_ids([*sys_msg, *history])
            if len(ids) <= room:
                self.history = history
                return ids
            if len(history) <= 1:
                raise TooLong(
                    f"(that message is {len(ids)} tokens with the system prompt; {room} fit "
                    "beside the answer's chat.max_new_tokens: not sent)"
                )
            history = history[2:]

    def prepare(self, user: str) -> list[int]:
        """Adds the user's turn; the prompt ids (`TooLong`, `DataError` for a message holding
        a reserved token: the turn is not kept, the history stays)."""
        before = self.history
        self.history = [*before, {"role": "user", "content": user}]
        try:
            return self.prompt_ids()
        except (TooLong, DataError):
            self.history = before
            raise

    def answer(self, user: str, emit: Callable[[str], None]) -> str:
        """`reply` to a new user turn."""
        return self.reply(self.prepare(user), emit)

    def reply(self, ids: list[int], emit: Callable[[str], None]) -> str:
        """Samples the reply `chat.stream` tokens per call, emitting the text as it grows; it
        ends at a stop token or at a structural string spelt by ordinary pieces (cut there)."""
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
            text, cut = cut_structural(self.tok.decode(new))
            part = text if cut else held_back(text)
            if part.startswith(shown):
                emit(part[len(shown) :])
                shown = part
            if stopped or cut:
                break
        text = cut_structural(self.tok.decode(new))[0]
        emit(text[len(shown) :] if text.startswith(shown) else "")
        self.history.append({"role": "assistant", "content": text})
        return text


def cut_structural(text: str) -> tuple[str, bool]:
    """`text` up to its first structural string (`<|user|>`, ...), and whether it had one."""
    at = min((j for j in (text.find(s) for s in STRUCTURAL) if j >= 0), default=-1)
    return (text[:at], True) if at >= 0 else (text, False)


def held_back(text: str) -> str:
    """What of a growing answer may be shown: not a character split over chunks (U+FFFD at
    the end), nor an end that may begin a structural string (`<|us`), both held back."""
    text = text.rstrip("\ufffd")
    for k in range(min(len(text), max(map(len, STRUCTURAL)) - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in STRUCTURAL):
            return text[:-k]
    return text


def repl(conv: Conversation, lines: Iterable[str], out: TextIO, max_turns: int = 0) -> list[dict]:
    """Reads user lines, prints streamed answers; returns the transcript. Ctrl-C while an
    answer streams cancels it; anywhere else it ends the chat, like end of input."""
    transcript: list[dict] = []
    out.write("chat: /reset, /system <text>, /quit\n")
    try:
        for raw in lines:
            go_on = _turn(conv, raw.rstrip("\n"), out, transcript)
            out.flush()  # a pipe's reader sees each turn's lines as they come
            if not go_on:
                break
            if max_turns and len(transcript) >= max_turns:
                break
    except KeyboardInterrupt:
        out.write("\n")
    return transcript


def _turn(conv: Conversation, line: str, out: TextIO, transcript: list[dict]) -> bool:
    """One input line (a command or a message); False to end the chat."""
    if line.strip() in ("/quit", "exit", "/exit"):
        return False
    if line.strip() == "/reset":
        conv.reset()
        out.write("(history cleared)\n")
    elif line.startswith("/system"):
        text = line.removeprefix("/system").strip()
        bad = next((s for s in STRUCTURAL if s in text), None)
        if bad:
            out.write(f"(a system prompt may not contain the reserved token {bad}: not set)\n")
        else:
            conv.reset(text)
            out.write("(system prompt set, history cleared)\n")
    elif line.strip():
        before = conv.history
        try:
            ids = conv.prepare(line)
        except TooLong as e:
            out.write(f"{e}\n")
            return True
        except DataError as e:
            bad = next((s for s in STRUCTURAL if s in line), None)
            why = f"contains the reserved token {bad}" if bad else f"is refused: {e}"
            out.write(f"(that message {why}: not sent)\n")
            return True
        out.write("assistant: ")
        try:
            reply = conv.reply(ids, lambda s: (out.write(s), out.flush()))
        except KeyboardInterrupt:
            conv.history = before
            out.write("\n(answer cancelled: not kept in the history)\n")
            return True
        out.write("\n")
        transcript.append({"user": line, "assistant": reply, "system": conv.system})
    return True


def input_lines(stream: TextIO) -> Iterable[str]:
    """The lines of `stream` (stdin), a byte that is not text in its encoding read as U+FFFD
    (a surrogate escape would reach the tokenizer)."""
    if hasattr(stream, "reconfigure"):
        stream.reconfigure(errors="replace")
    return stream


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
    transcript = repl(conv, input_lines(sys.stdin), sys.stdout, cfg.chat.max_turns)
    if jax.process_index() == 0:
        text = "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in transcript)
        atomic_write_text(run_dir.path / "chat.jsonl", text)
    return {"turns": len(transcript), "outputs": {"chat": str(run_dir.path / "chat.jsonl")}}
