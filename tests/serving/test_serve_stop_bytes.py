"""`stage: serve` stopped by a signal finishes its run (summary.json); chat log-probs'
`bytes` are each token's own bytes; a quantised checkpoint is not silently requantised."""

import json
import os
import signal
import threading
import time
import urllib.request

import pytest
from tokenizers import Tokenizer as HFTok
from tokenizers import decoders, models, pre_tokenizers, trainers

from jaxllm.config import QuantizeConfig, from_dict
from jaxllm.errors import ConfigError
from jaxllm.generation.engine import Token
from jaxllm.serving.choices import chat_logprobs
from jaxllm.serving.server import free_port
from jaxllm.sharding import make_mesh
from jaxllm.tokenizer.hf import HFTokenizer, add_special_tokens
from jaxllm.trainers import run_stage
from jaxllm.trainers.checkpoint_model import load_checkpoint_model, quantize_state

STOPS = (signal.SIGINT, signal.SIGTERM)


@pytest.mark.parametrize("sig", STOPS, ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_stage_serve_and_finishes_the_run(tmp_path, tiny_ckpt, sig):
    port = free_port()
    cfg = from_dict({
        "stage": "serve", "output_dir": str(tmp_path / "s"), "overwrite": False,
        "inputs": {"checkpoint": str(tiny_ckpt)},
        "serve": {"port": port, "slots": 2, "max_len": 32, "warmup": False},
    })  # fmt: skip
    raised = []  # what reaches the handlers outside the server: nothing, once it stopped

    def stop_once_up() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        os.kill(os.getpid(), sig)

    before = {s: signal.signal(s, lambda n, f: raised.append(n)) for s in STOPS}
    killer = threading.Thread(target=stop_once_up, daemon=True)
    killer.start()
    try:
        summary = run_stage(cfg)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    killer.join(timeout=5)
    assert raised == []  # uvicorn did not raise the signal again after its shutdown
    saved = json.loads((tmp_path / "s/summary.json").read_text())
    assert saved == summary and saved["stopped_by"] == sig.name
    assert saved["url"] == f"http://127.0.0.1:{port}/v1" and saved["steps"] == 0


def byte_level_tokenizer(path):
    """A GPT-2 style byte-level BPE (with the chat tokens added as special tokens)."""
    path.mkdir()
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(["hello world, the quick brown fox"] * 50, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    add_special_tokens(path / "tokenizer.json", ["<|user|>", "<|end|>"])
    return HFTokenizer.load(path)


def test_chat_logprob_bytes_are_each_tokens_own_bytes(tok, tmp_path):
    text = "hello é 😀 world<|user|> ok"  # 😀 (and é) split over byte tokens
    for t in (tok, byte_level_tokenizer(tmp_path / "bl")):
        ids = t.encode(text)
        assert t.decode(ids) == text
        tokens = [Token(i, -1.0, [i, ids[0]], [-1.0, -2.0]) for i in ids]
        content = chat_logprobs(t, tokens, 2)["content"]
        assert b"".join(bytes(c["bytes"]) for c in content) == text.encode("utf-8")
        tops = b"".join(bytes(c["top_logprobs"][0]["bytes"]) for c in content)
        assert tops == text.encode("utf-8")
        # a 4-byte character: no token's bytes hold U+FFFD's (EF BF BD)
        assert all(bytes(c["bytes"]) != "\ufffd".encode() for c in content)
    assert any(tok.is_byte(i) for i in tok.encode("😀"))  # the case under test


def test_a_quantised_checkpoint_is_not_requantised_silently(tiny_ckpt):
    mesh = make_mesh(from_dict({"stage": "generate"}).mesh)
    g, state, _, _ = load_checkpoint_model(tiny_ckpt, mesh)
    g4, s4 = quantize_state(g, state, QuantizeConfig("int4", group_size=16), mesh)
    for same in (QuantizeConfig("int4", group_size=16), QuantizeConfig("none")):
        assert quantize_state(g4, s4, same, mesh) == (g4, s4)  # as it is
    for other, want in ((QuantizeConfig("int8"), "int8"),
                        (QuantizeConfig("int4", group_size=8), "int4, group_size 8")):  # fmt: skip
        with pytest.raises(ConfigError, match="quantize.method") as e:
            quantize_state(g4, s4, other, mesh)
        assert "(int4, group_size 16)" in str(e.value) and f"as {want};" in str(e.value)
        assert "\n" not in str(e.value)
    g8, s8 = quantize_state(g, state, QuantizeConfig("int8"), mesh)
    assert quantize_state(g8, s8, QuantizeConfig("int8", group_size=7), mesh) == (g8, s8)
    with pytest.raises(ConfigError, match=r"already quantised \(int8\)"):
        quantize_state(g8, s8, QuantizeConfig("int4", group_size=16), mesh)
