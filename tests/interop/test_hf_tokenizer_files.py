"""An imported HF tokenizer.json model as transformers reads it: a literal `<s>` in text is text
(the bos/eos aliases only where jaxllm's chat template puts them), special tokens named only by
special_tokens_map.json / generation_config.json, generation_config.json's eos list kept on
import (generate stops there) and merged on export, jaxllm's chat template in the exported
tokenizer_config.json, and new chat-token rows that start distinct."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from jaxllm.config import GenerateConfig  # noqa: E402
from jaxllm.generation import batched  # noqa: E402
from jaxllm.generation.sampler import SampleResult  # noqa: E402
from jaxllm.interop import load_tokenizer  # noqa: E402
from jaxllm.tokenizer.chat import ChatTemplate, render_text  # noqa: E402
from jaxllm.trainers.hf_export import _copy_tokenizer, _special_ids  # noqa: E402
from jaxllm.trainers.hf_import import _grow_vocab, add_chat_tokens, copy_tokenizer  # noqa: E402

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]  # ids 0, 1, 2
CHAT = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "the fox"}]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A Llama-3-like tokenizer.json (eos <|eot_id|>; generation_config eos [1, 2])."""
    d = tmp_path_factory.mktemp("hf") / "llama3"
    d.mkdir()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=alphabet
    )
    tok.train_from_iterator(["hello world, the quick brown fox <s> was $99"] * 50, trainer)
    tok.save(str(d / "tokenizer.json"))
    conf = {"bos_token": SPECIALS[0], "eos_token": SPECIALS[2], "chat_template": "{{ 'ChatML' }}"}
    (d / "tokenizer_config.json").write_text(json.dumps(conf))
    (d / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 0, "eos_token_id": [1, 2], "temperature": 0.6})
    )
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return d


def hf_ids(directory, text):
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))(
        text, add_special_tokens=False
    )["input_ids"]


def test_literal_bos_eos_names_are_text_as_in_transformers(hf_dir):
    tok = load_tokenizer(hf_dir)
    for text in ("Was <s>$99</s> now", "<s>", "a </s> b", "<s>hello world</s>"):
        assert tok.encode(text) == hf_ids(hf_dir, text), text
        assert tok.decode(tok.encode(text)) == text
    # jaxllm's chat template as text still means the model's BOS / EOS (0 / 2)
    imported = copy_tokenizer(hf_dir, hf_dir.parent / "imp_alias")
    add_chat_tokens(imported)
    chat = load_tokenizer(imported)
    r = ChatTemplate(chat).render(CHAT)
    assert r.ids[0] == 0 and r.ids[-1] == 2 and chat.encode(render_text(CHAT)) == r.ids


def test_special_tokens_fall_back_to_map_then_generation_config(tmp_path, hf_dir):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}))
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 1}))
    tok = load_tokenizer(d)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 1, -1)
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": SPECIALS[2]}}))
    assert (load_tokenizer(d).bos_id, load_tokenizer(d).eos_id) == (1, 2)
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": None}))  # Qwen2: none
    assert load_tokenizer(d).bos_id == -1


def test_generation_config_eos_ids_are_kept_and_stop_generate(tmp_path, hf_dir, monkeypatch):
    out = tmp_path / "run"  # not there yet: copy_tokenizer makes it
    tok = load_tokenizer(copy_tokenizer(hf_dir, out))
    assert tok.eos_id == 2 and tok.eos_ids == [2, 1]
    seen = {}

    def fake_sample_all(sampler, state, prompts, **kw):
        seen.update(kw)
        return SampleResult(*([[]] * 4))

    monkeypatch.setattr(batched, "sample_all", fake_sample_all)
    monkeypatch.setattr(batched, "Sampler", lambda *a, **k: None)
    cfg = GenerateConfig(prompts=("hi",), stop=("</s>", "<s>"))
    batched.generate_text(None, None, tok, ["hi"], cfg, key=jax.random.key(0))
    # the aliases "</s>", "<s>": EOS 2, BOS 0; generation_config's other eos: 1
    assert sorted(seen["stop_ids"]) == [0, 1, 2]


def test_eval_generation_stops_at_generation_config_eos_ids(tmp_path, hf_dir, monkeypatch):
    """`stage: eval` / the lm-eval bridge stop where generate and serve do: the EOS and the
    generation config's other eos ids (here 2 and 1)."""
    from jaxllm.evaluation.runner import GenOptions
    from jaxllm.trainers import eval_model

    tok = load_tokenizer(copy_tokenizer(hf_dir, tmp_path / "run"))
    seen = {}

    def fake_sample_all(sampler, state, prompts, **kw):
        seen.update(kw)
        return SampleResult(*([[[]] * len(prompts)] * 4))

    monkeypatch.setattr(eval_model, "sample_all", fake_sample_all)
    monkeypatch.setattr(eval_model, "Sampler", lambda *a, **k: None)
    model = eval_model.EvalModel(None, None, tok, max_len=64)
    model.generate(["hi"], GenOptions(max_new_tokens=4, until=()))
    assert sorted(seen["stop_ids"]) == [1, 2]


def test_export_merges_eos_list_and_writes_jaxllm_chat_template(tmp_path, hf_dir):
    src = copy_tokenizer(hf_dir, tmp_path / "imp")
    add_chat_tokens(src)
    end = load_tokenizer(src).special_ids["<|end|>"]
    gen = _special_ids(src)["generation"]
    assert gen["eos_token_id"] == [2, 1, end] and gen["temperature"] == 0.6
    out = tmp_path / "exp"
    out.mkdir()
    (out / "generation_config.json").write_text("{}")  # the export's own: not overwritten
    _copy_tokenizer(src, out)
    assert json.loads((out / "generation_config.json").read_text()) == {}
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(out)
    theirs = hf.apply_chat_template(CHAT[:1], add_generation_prompt=True, tokenize=False)
    want = ChatTemplate(load_tokenizer(src)).render(CHAT[:1], add_generation_prompt=True).ids
    assert theirs == "<|begin_of_text|><|user|>hello world<|end|><|assistant|>"
    assert hf(theirs, add_special_tokens=False)["input_ids"] == want


def test_chat_tokens_use_tokenizer_json_when_both_are_there(tmp_path, hf_dir):
    d = tmp_path / "both"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    (d / "tokenizer.model").write_bytes(b"sentencepiece")
    assert copy_tokenizer(d, tmp_path / "a") == str(tmp_path / "a/tokenizer.model")
    path = copy_tokenizer(d, tmp_path / "b", prefer_json=True)
    assert path == str(tmp_path / "b/tokenizer") and add_chat_tokens(path)[0] == 6


def test_grown_rows_are_mean_plus_scaled_noise():
    rng = np.random.default_rng(0)
    emb = (rng.normal(0.3, 2.0, (200, 64)) * rng.uniform(0.5, 2, 64)).astype(np.float32)
    head = rng.normal(0.0, 0.5, (64, 200)).astype(np.float32)
    params = nnx.State({"embed": {"embedding": nnx.Param(emb)}, "head": nnx.Param(head)})
    grown = _grow_vocab(params, 206, jax.random.key(0))
    e, h = np.asarray(grown["embed"]["embedding"][...]), np.asarray(grown["head"][...])
    np.testing.assert_array_equal(e[:200], emb)
    np.testing.assert_array_equal(h[:, :200], head)
    for new, old in ((e[200:], emb), (h[:, 200:].T, head.T)):
        z = (new - old.mean(0)) / (old.std(0) * np.sqrt(1e-5))  # N(0, 1) per entry
        assert abs(z.mean()) < 0.2 and 0.85 < z.std() < 1.15
        assert len({row.tobytes() for row in new}) == 6  # distinct rows
    again = _grow_vocab(
        nnx.State({"embed": {"embedding": nnx.Param(emb)}, "head": nnx.Param(head)}),
        206,
        jax.random.key(0),
    )
    np.testing.assert_array_equal(np.asarray(again["embed"]["embedding"][...]), e)  # seeded
