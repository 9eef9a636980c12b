"""An imported tokenizer.json model made chat-ready: `hf.chat_tokens` adds the template's
tokens, grows the embedding/head with distinct near-mean rows (old logits unchanged), and the
result fine-tunes with LoRA (and the chat tokens' rows) through `configs/hf_sft_lora.yaml`."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from jaxllm.config import from_dict, read_yaml  # noqa: E402
from jaxllm.interop import load_tokenizer  # noqa: E402
from jaxllm.rundir import RunDir  # noqa: E402
from jaxllm.sharding import make_mesh  # noqa: E402
from jaxllm.tokenizer.chat import ChatTemplate  # noqa: E402
from jaxllm.trainers import sft  # noqa: E402
from jaxllm.trainers.hf_import import import_hf  # noqa: E402
from jaxllm.trainers.lm import load_checkpoint_model  # noqa: E402

from ..sft.conftest import ROOT, sft_texts  # noqa: E402


def make_hf_dir(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(sft_texts(400), trainer)
    vocab = tok.get_vocab_size() + 2  # room for 2 of the 6 chat tokens: the rest must grow it
    torch.manual_seed(0)
    conf = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=vocab, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(conf).eval()
    hf.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    meta = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (path / "tokenizer_config.json").write_text(json.dumps(meta))
    return hf, vocab


def test_chat_tokens_grow_vocab_and_lora_sft(tmp_path):
    hf, V = make_hf_dir(tmp_path / "hf")
    cfg = from_dict({"stage": "import", "hf": {"path": str(tmp_path / "hf"), "chat_tokens": True}})
    summary = import_hf(tmp_path / "hf", tmp_path / "imp", cfg)
    assert summary["chat_tokens_added"] == 6 and summary["vocab_size"] == V + 4
    tok = load_tokenizer(summary["outputs"]["tokenizer"])
    template = ChatTemplate(tok)  # raises if a chat token is missing
    assert template.ids["<s>"] == 1 and template.ids["</s>"] == 2

    mesh = make_mesh(from_dict({"stage": "sft"}).mesh, jax.devices()[:1])
    graphdef, state, m, _ = load_checkpoint_model(tmp_path / "imp/checkpoints", mesh)
    model = nnx.merge(graphdef, state)
    emb = np.asarray(model.embed.embedding[...])
    # each new row: the old rows' mean + N(0, 1e-5 var_d) noise, so no two are equal
    noise = (emb[V:] - emb[:V].mean(0)) / emb[:V].std(0)
    assert np.abs(noise).max() < 6 * np.sqrt(1e-5) and len({r.tobytes() for r in emb[V:]}) == 4
    ids = np.array([[1, 5, 9, 17, 33, 60]])
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()
    got = np.asarray(model(ids))
    np.testing.assert_allclose(got[..., :V], want, atol=1e-4)  # the old vocabulary unchanged

    raw = read_yaml(ROOT / "configs/hf_sft_lora.yaml")
    raw.update(name="hf_lora", output_dir=str(tmp_path / "lora"), progress=False)
    raw["inputs"]["checkpoint"] = str(tmp_path / "imp/checkpoints")
    raw["sft"].update(eval_examples=4, eval_max_new_tokens=4)
    raw["loader"] = {"seq_len": 64, "batch_size": 8}
    raw["mesh"] = {"data": -1, "fsdp": 1, "tensor": 1, "rules": "dp"}
    raw["train"].update(steps=3, eval_every=3, checkpoint_every=3, eval_batches=1)
    raw["train"]["optim"]["lr"] = 1e-2
    cfg = from_dict(raw)
    run_dir = RunDir.open(cfg)
    out = run_dir.finish(sft.run(cfg, run_dir))
    # rank 16 on d 32 (2 heads of 16, 1 kv head), d_ff 64: q, o (32 + 32) * 16 each; k, v
    # (32 + 16) * 16 each; up, gate, down (32 + 64) * 16 each; the six chat tokens' rows and head columns 2 * 6 * 32
    blocks = 2 * 64 * 16 + 2 * 48 * 16 + 3 * 96 * 16
    assert blocks == 8192 and out["trainable_params"] == blocks + 2 * 6 * 32
    assert out["val_loss_after"] < out["val_loss_before"]
    kept = tmp_path / "lora/tokenizer"  # the run keeps the imported tokenizer's files
    names = {p.name for p in kept.iterdir()}
    assert names == {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    assert out["outputs"]["tokenizer"] == str(kept)

    # export merges the adapters: transformers loads plain weights giving the adapted logits
    from jaxllm.trainers.hf_export import export_checkpoint

    exp = export_checkpoint(tmp_path / "lora/checkpoints", tmp_path / "exp")
    assert exp["outputs"]["tokenizer"] == str(tmp_path / "exp")
    assert (tmp_path / "exp/tokenizer.json").read_bytes() == (kept / "tokenizer.json").read_bytes()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exp").eval()
    # the tokenizer's ids, not the class defaults; generate also stops at the end of a turn
    assert (
        (back.config.bos_token_id, back.config.eos_token_id) == (tok.bos_id, tok.eos_id) == (1, 2)
    )
    assert back.generation_config.eos_token_id == [2, tok.special_ids["<|end|>"]]
    g, adapted, _, _ = load_checkpoint_model(tmp_path / "lora/checkpoints", mesh)
    assert jax.tree.leaves(nnx.state(nnx.merge(g, adapted), nnx.LoRAParam))  # adapters, unmerged
    with torch.no_grad():
        exported = back(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(exported, np.asarray(nnx.merge(g, adapted)(ids)), atol=1e-4)
