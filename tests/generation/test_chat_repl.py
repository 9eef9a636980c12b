"""The chat REPL driven as a user would (lines in, a scripted sampler): `--set chat.system`
on the CLI, a too-long message keeps the history, a role token ends the reply (not the
session), Ctrl-C cancels an answer or ends the chat with its transcript, non-UTF-8 input."""

import io
import json
from pathlib import Path

import pytest

from jaxllm.config import ChatConfig, load_config
from jaxllm.errors import ConfigError
from jaxllm.generation.sampler import SampleResult
from jaxllm.trainers import chat
from jaxllm.trainers.chat import Conversation, input_lines, repl


class Script:
    """The sampler replaced by a script: reply n is `replies[n]` (the last one repeats), each
    call cut after its first stop id as the sampler does; Ctrl-C (KeyboardInterrupt) in the
    call numbered `interrupt_at` (1-based, counting every sampler call)."""

    def __init__(self, monkeypatch, replies: list[list[int]], interrupt_at: int = 0):
        self.replies, self.interrupt_at = replies, interrupt_at
        self.n, self.done, self.calls, self.expect, self.stop_ids = -1, 0, 0, None, None
        monkeypatch.setattr(chat, "sample_all", self)
        monkeypatch.setattr(chat, "Sampler", lambda *a, **k: None)

    def __call__(self, sampler, state, prompts, *, max_new_tokens, stop_ids, **kw):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        prompt = prompts[0]
        if prompt != self.expect:  # not the continuation of the last call: a new reply
            self.n, self.done = self.n + 1, 0
        toks = self.replies[min(self.n, len(self.replies) - 1)][self.done :][:max_new_tokens]
        stop = next((i for i, t in enumerate(toks) if t in stop_ids), None)
        toks = toks if stop is None else toks[: stop + 1]
        self.done, self.expect, self.stop_ids = self.done + len(toks), prompt + toks, stop_ids
        return SampleResult([toks], [[0.0] * len(toks)], [len(toks)], [stop is not None])


def no_escape(f, *args):
    """`f(*args)`; a Ctrl-C that escapes it fails the test (instead of stopping pytest)."""
    try:
        return f(*args)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the chat")


def end(tok) -> int:
    return tok.special_ids["<|end|>"]


def conv_for(tok, max_len=64, **cfg) -> Conversation:
    return Conversation(None, None, tok, max_len, ChatConfig(**{"max_new_tokens": 16, **cfg}))


def test_cli_chat_has_no_system_prompt_unless_one_is_given(monkeypatch):
    """No shipped SFT record has a system turn: the chat's default is none (the library's
    `assistant` prompt only by name)."""
    from jaxllm import chat as cli

    seen = []

    def fake_main(argv):  # what `python -m jaxllm.main` would load
        seen.append(load_config(argv[1], argv[3::2]).chat)
        return 0

    monkeypatch.setattr(cli, "run_main", fake_main)
    cli.main(["--checkpoint", "ck"])
    cli.main(["--checkpoint", "ck", "--set", "chat.system=Be brief."])
    cli.main(["--checkpoint", "ck", "--set", "chat.prompt=assistant"])
    assert [(c.system, c.prompt) for c in seen] == [
        ("", ""), ("Be brief.", ""), ("", "assistant")
    ]  # fmt: skip
    with pytest.raises(ConfigError, match=r"'chat.system': set beside .*chat.prompt=''"):
        cli.main(["--checkpoint", "ck", "--set", "chat.system=x", "--set", "chat.prompt=assistant"])
    shipped = load_config(str(Path(__file__).parents[2] / "configs/chat.yaml")).chat
    assert (shipped.system, shipped.prompt) == ("", "")


def test_a_too_long_message_keeps_the_earlier_conversation(monkeypatch, tok):
    Script(monkeypatch, [tok.encode("five") + [end(tok)], tok.encode("eight") + [end(tok)]])
    conv, out = conv_for(tok), io.StringIO()
    transcript = repl(conv, ["2+3?", "4+4?", "word " * 60, "again"], out)
    assert "not sent" in out.getvalue()
    assert [t["user"] for t in transcript] == ["2+3?", "4+4?", "again"]
    # 48 tokens of room hold the three short exchanges: the refused message dropped nothing
    contents = ["2+3?", "five", "4+4?", "eight", "again", "eight"]
    assert [m["content"] for m in conv.history] == contents


@pytest.mark.parametrize("stream", [1, 3, 16])
def test_a_role_token_ends_the_reply_and_the_chat_goes_on(monkeypatch, tok, stream):
    user, asst = tok.special_ids["<|user|>"], tok.special_ids["<|assistant|>"]
    script = Script(monkeypatch, [
        tok.encode("Hard") + [user] + tok.encode("ard to say") + [end(tok)],  # a role token
        tok.encode("Fine <|user|> x", specials=False) + [end(tok)],  # spelt by plain pieces
        tok.encode("ok") + [asst] + [end(tok)],
    ])  # fmt: skip
    conv, out = conv_for(tok, stream=stream), io.StringIO()
    shown = io.StringIO()
    out.write = lambda s: (shown.write(s), len(s))[1]
    transcript = repl(conv, ["Hi", "How are you?", "Bye"], out)
    assert [t["assistant"] for t in transcript] == ["Hard", "Fine ", "ok"]
    # every structural id stops the sampler (<s> </s> <|end|> and the three role tokens)
    structural = ("<s>", "</s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")
    assert set(script.stop_ids) >= {tok.special_ids[s] for s in structural}
    # nothing of a structural string reached the terminal, even streamed one token a time
    assert "assistant: Fine \n" in shown.getvalue() and "<|" not in shown.getvalue()
    assert [m["content"] for m in conv.history[1::2]] == ["Hard", "Fine ", "ok"]


def test_a_message_or_system_prompt_with_a_reserved_token_is_refused(monkeypatch, tok):
    Script(monkeypatch, [tok.encode("ok") + [end(tok)]])
    conv, out = conv_for(tok), io.StringIO()
    transcript = repl(conv, ["hi", "say <|end|> now", "/system be <|user|>", "again"], out)
    assert "reserved token <|end|>: not sent" in out.getvalue()
    assert "reserved token <|user|>: not set" in out.getvalue() and conv.system == ""
    assert [t["user"] for t in transcript] == ["hi", "again"] and len(conv.history) == 4
    with pytest.raises(ConfigError, match="'chat.system': the system prompt holds .*<s>"):
        conv_for(tok, system="a <s> b")


def test_ctrl_c_cancels_a_streaming_answer_and_at_the_input_ends_the_chat(monkeypatch, tok):
    # answers stream 2 tokens a call; Ctrl-C comes in the first call of the second answer
    ok = tok.encode("ok") + [end(tok)]
    first = -(-len(ok) // 2)  # calls the first answer takes
    Script(monkeypatch, [ok], interrupt_at=first + 1)

    def user():  # a terminal: three lines, then Ctrl-C at the prompt
        yield from ["hi", "tell me more", "hello"]
        raise KeyboardInterrupt
        yield "never read"

    conv, out = conv_for(tok, stream=2), io.StringIO()
    transcript = no_escape(repl, conv, user(), out)
    assert "(answer cancelled" in out.getvalue()
    assert [t["user"] for t in transcript] == ["hi", "hello"]
    assert [m["content"] for m in conv.history] == ["hi", "ok", "hello", "ok"]


class Terminal(io.RawIOBase):
    """stdin bytes, then Ctrl-C while the next line is awaited."""

    def __init__(self, data: bytes):
        self.data = data

    def readable(self):
        return True

    def readinto(self, b):
        if not self.data:
            raise KeyboardInterrupt
        n = min(len(b), len(self.data))
        b[:n], self.data = self.data[:n], self.data[n:]
        return n


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])  # a UTF-8 / C locale's stdin
def test_bytes_that_are_not_utf8_read_as_replacement_characters(monkeypatch, tok, errors):
    Script(monkeypatch, [tok.encode("ok") + [end(tok)]])
    data = b"Hi\ncaf\xe9 ok?\nbye\n"
    stdin = io.TextIOWrapper(io.BufferedReader(Terminal(data)), "utf-8", errors=errors)
    transcript = no_escape(repl, conv_for(tok), input_lines(stdin), io.StringIO())
    assert [t["user"] for t in transcript] == ["Hi", "caf\ufffd ok?", "bye"]
    assert data.decode("utf-8", "replace").splitlines() == [t["user"] for t in transcript]


def test_the_chat_stage_writes_its_transcript_after_ctrl_c(monkeypatch, tok, tiny_ckpt, tmp_path):
    from jaxllm import chat as cli

    Script(monkeypatch, [tok.encode("ok") + [end(tok)]])
    stdin = io.TextIOWrapper(io.BufferedReader(Terminal(b"caf\xe9?\n")), "utf-8")
    monkeypatch.setattr("sys.stdin", stdin)
    sets = [f"output_dir={tmp_path}", "chat.max_new_tokens=4"]
    args = ["--checkpoint", str(tiny_ckpt), *(x for s in sets for x in ("--set", s))]
    assert no_escape(cli.main, args) == 0
    rows = [json.loads(x) for x in (tmp_path / "chat.jsonl").read_text().splitlines()]
    assert [(r["user"], r["assistant"]) for r in rows] == [("caf\ufffd?", "ok")]
    assert json.loads((tmp_path / "summary.json").read_text())["turns"] == 1


class _TwoEnds:
    """`tok` with a HF model's second end id (generation_config.json's eos list)."""

    def __init__(self, tok, extra: int):
        self._tok, self.eos_ids = tok, [tok.eos_id, extra]

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_every_eos_id_of_the_tokenizer_ends_the_reply(monkeypatch, tok):
    """As generate, serve and eval: an imported model's other end ids stop the answer too."""
    extra = tok.encode("zz", specials=False)[0]  # an ordinary piece, standing in for one
    Script(monkeypatch, [tok.encode("ab") + [extra] + tok.encode("cd") + [end(tok)]])
    conv = Conversation(None, None, _TwoEnds(tok, extra), 64, ChatConfig(max_new_tokens=16))
    transcript = repl(conv, ["Hi"], io.StringIO())
    assert transcript[0]["assistant"] == tok.decode(tok.encode("ab"))
