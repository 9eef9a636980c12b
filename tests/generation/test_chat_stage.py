"""`stage: chat`: the REPL streams the same answer greedy decoding gives in one call, keeps
and resets history, drops the oldest turns to fit; the prompt library renders with the chat
template."""

import io
from pathlib import Path

import jax
import yaml

from jaxllm.config import ChatConfig
from jaxllm.generation import sample_all
from jaxllm.tokenizer.chat import END_TOKEN, STRUCTURAL, ChatTemplate, render_text
from jaxllm.trainers.chat import Conversation, library_prompt, repl
from jaxllm.trainers.eval_model import EvalModel

PROMPTS = Path(__file__).resolve().parents[2] / "jaxllm" / "assets" / "prompts"


def test_prompt_library_renders_with_the_chat_template(tok):
    for path in sorted(PROMPTS.glob("*.yaml")):
        system = library_prompt(path.stem)
        assert system == yaml.safe_load(path.read_text())["system"]
        messages = [{"role": "system", "content": system}, {"role": "user", "content": "2 + 3?"}]
        text = render_text(messages, add_generation_prompt=True)
        assert tok.encode(text) == ChatTemplate(tok).prompt_ids(messages)


def test_repl_streams_the_greedy_answer_and_keeps_history(tiny_ckpt):
    m = EvalModel.load(tiny_ckpt)
    cfg = ChatConfig(temperature=0.0, max_new_tokens=6, stream=2, prompt="assistant")
    conv = Conversation(m.graphdef, m.state, m.tok, m.max_len, cfg)
    out = io.StringIO()
    lines = ["What is 2 + 3?", "/reset", "/system Be brief.", "hello", "again", "/quit", "x"]
    transcript = repl(conv, lines, out)
    assert [t["user"] for t in transcript] == ["What is 2 + 3?", "hello", "again"]
    assert transcript[1]["system"] == "Be brief." and len(conv.history) == 4
    # the first answer, streamed 2 tokens at a time, equals one greedy call of 6 tokens
    ids = ChatTemplate(m.tok).prompt_ids([
        {"role": "system", "content": library_prompt("assistant")},
        {"role": "user", "content": "What is 2 + 3?"},
    ])  # fmt: skip
    res = sample_all(conv.sampler, m.state, [ids], batch_size=1,
                     key_for=lambda n: jax.random.key(0), max_new_tokens=6, temperature=0.0,
                     stop_ids=[m.tok.special_ids[END_TOKEN], m.tok.eos_id])  # fmt: skip
    toks = res.tokens[0][:-1] if res.stopped[0] else res.tokens[0]
    # the answer ends at the first structural token (a role token too): cut the reference there
    structural = {m.tok.special_ids[s] for s in STRUCTURAL if s in m.tok.special_ids}
    toks = toks[: next((i for i, t in enumerate(toks) if t in structural), len(toks))]
    assert transcript[0]["assistant"] == m.tok.decode(toks)
    assert f"assistant: {transcript[0]['assistant']}\n" in out.getvalue()


def test_old_turns_are_dropped_to_fit(tiny_ckpt):
    m = EvalModel.load(tiny_ckpt)
    cfg = ChatConfig(temperature=0.0, max_new_tokens=4)
    conv = Conversation(m.graphdef, m.state, m.tok, 48, cfg)
    conv.history = [{"role": r, "content": "word " * 8} for r in ("user", "assistant") * 3]
    conv.history.append({"role": "user", "content": "last"})
    ids = conv.prompt_ids()
    assert len(ids) <= 48 - 4 and conv.history[-1]["content"] == "last"
    assert len(conv.history) < 7


def scripted(monkeypatch, tok, answer: str):
    """The sampler replaced by a script: the tokens of `answer`, then `<|end|>`."""
    from jaxllm.generation.sampler import SampleResult
    from jaxllm.trainers import chat

    script = tok.encode(answer) + [tok.special_ids[END_TOKEN]]

    def fake(sampler, state, prompts, *, max_new_tokens, stop_ids, **kw):
        done = len(prompts[0]) - fake.prompt_len
        toks = script[done : done + max_new_tokens]
        return SampleResult([toks], [[0.0] * len(toks)], [len(toks)], [toks[-1] in stop_ids])

    monkeypatch.setattr(chat, "sample_all", fake)
    monkeypatch.setattr(chat, "Sampler", lambda *a, **k: None)
    return fake


def test_streaming_never_drops_a_character_split_over_chunks(monkeypatch, tok):
    answer = "Pasta: ünïcödé 鸀鸁 and 𝔘 done."  # rare characters: byte-fallback pieces
    assert any(tok.is_byte(i) for i in tok.encode(answer))
    fake = scripted(monkeypatch, tok, answer)
    for stream in (1, 2, 3, 5):
        conv = Conversation(None, None, tok, 128, ChatConfig(max_new_tokens=64, stream=stream))
        fake.prompt_len = len(conv.template.prompt_ids([{"role": "user", "content": "hi"}]))
        shown = []
        assert conv.answer("hi", shown.append) == answer == "".join(shown), stream


def test_a_message_too_long_for_the_context_is_refused_and_the_chat_goes_on(monkeypatch, tok):
    import pytest

    from jaxllm.errors import ConfigError

    with pytest.raises(ConfigError, match="'chat.max_new_tokens': 128 leaves no room"):
        Conversation(None, None, tok, 128, ChatConfig(max_new_tokens=128))
    fake = scripted(monkeypatch, tok, "ok")
    conv = Conversation(None, None, tok, 64, ChatConfig(max_new_tokens=16, stream=4))
    fake.prompt_len = len(conv.template.prompt_ids([{"role": "user", "content": "hi"}]))
    out = io.StringIO()
    transcript = repl(conv, ["word " * 60, "hi", "/quit"], out)
    assert "that message is" in out.getvalue() and "not sent" in out.getvalue()
    assert [t["user"] for t in transcript] == ["hi"] and transcript[0]["assistant"] == "ok"
    assert conv.history == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "ok"},
    ]
