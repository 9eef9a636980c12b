"""Test setup: 8 simulated CPU devices for multi-device code (set before jax is imported)."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tok(tmp_path_factory: pytest.TempPathFactory):
    """A small sentencepiece tokenizer with the chat tokens, trained on the shipped SFT set."""
    from jaxllm.config import TokenizerConfig
    from jaxllm.tokenizer import Tokenizer, train_tokenizer
    from tests.sft.conftest import sft_texts

    cfg = TokenizerConfig(vocab_size=1300, character_coverage=0.98)
    path = train_tokenizer(sft_texts(), cfg, tmp_path_factory.mktemp("tok") / "tokenizer")
    return Tokenizer.load(path)


@pytest.fixture(scope="session")
def template(tok):
    from jaxllm.tokenizer.chat import ChatTemplate

    return ChatTemplate(tok)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory, tok):
    """A d_model 32, one-layer decoder pretrained a few steps with `tok` (its data dir is
    `tiny_ckpt.parent.parent / "data"`): the start of every post-training stage test."""
    from tests.sft.test_sft_stage import pretrain

    return pretrain(tmp_path_factory.mktemp("tiny"), tok.path)
