"""`HFTokenizer` (a tokenizer.json): the `<s>`/`</s>` aliases of the model's own BOS/EOS in
jaxllm's chat template (elsewhere they are text), special-token strings kept as text on
request, and a model without a BOS (Qwen2's)."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxllm.data.pipeline import encode_documents
from jaxllm.tokenizer.chat import END_TOKEN, ROLE_TOKENS, ChatTemplate, render_text
from jaxllm.tokenizer.hf import HFTokenizer, add_special_tokens

EOT = "<|endoftext|>"
CHAT = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]


def make(path, bos):
    """A byte-level BPE with GPT-2's one special token and the chat tokens added."""
    path.mkdir()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOT], initial_alphabet=alphabet)
    tok.train_from_iterator(["hello world, the quick brown fox"] * 50, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos, "eos_token": EOT}))
    add_special_tokens(path / "tokenizer.json", [*ROLE_TOKENS.values(), END_TOKEN])
    return HFTokenizer.load(path)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return make(tmp_path_factory.mktemp("hf") / "gpt2", EOT)


def test_aliases_are_the_models_bos_and_eos(gpt2):
    eot, plain = gpt2.piece_to_id(EOT), gpt2.encode("hello world")
    assert gpt2.bos_id == gpt2.eos_id == eot and eot not in plain
    # outside the chat template they are text, as transformers encodes them
    assert gpt2.decode(gpt2.encode("<s>hello world</s>")) == "<s>hello world</s>"
    assert gpt2.encode("<s><|user|>") == [eot, gpt2.piece_to_id("<|user|>")]
    r = ChatTemplate(gpt2).render(CHAT)
    assert r.ids == gpt2.encode(render_text(CHAT)) and r.ids[0] == r.ids[-1] == eot


def test_specials_false_keeps_special_strings_as_text(gpt2):
    text = "<s>Was $20</s> now <|user|> and <|endoftext|>"
    ids = gpt2.encode(text, specials=False)
    assert not set(ids) & set(gpt2.special_ids.values())
    assert gpt2.decode(ids) == text
    assert gpt2.piece_to_id("<|user|>") in gpt2.encode(text)  # by default they are specials
    eot = gpt2.piece_to_id(EOT)
    assert encode_documents(gpt2, [f"<s>{text}</s>"]) == [[eot, *ids, eot]]


def test_a_tokenizer_without_bos_renders_chats_without_one(tmp_path):
    qwen = make(tmp_path / "qwen2", None)  # Qwen2: bos_token null
    assert qwen.bos_id == -1 and "<s>" not in qwen.special_ids
    r = ChatTemplate(qwen).render(CHAT)
    assert r.ids[0] == qwen.piece_to_id("<|user|>") and r.ids[-1] == qwen.eos_id
    assert r.ids == qwen.encode(render_text(CHAT))  # "<s>" stands for no token
    assert encode_documents(qwen, ["<s>hello</s>"]) == [[*qwen.encode("hello"), qwen.eos_id]]
