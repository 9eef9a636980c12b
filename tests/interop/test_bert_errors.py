"""BERT import/export errors for people (one line naming the file, key or tensor), and a
torch-free export → import → export round trip. HF directories are written by our own exporter
(`conftest.write_bert_dir`) and broken on purpose: no torch needed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from jaxllm.config import from_dict
from jaxllm.errors import JaxllmError
from jaxllm.interop import SafetensorsReader, write_safetensors
from jaxllm.interop.export import export_hf
from jaxllm.main import main
from jaxllm.models import make_decoder
from jaxllm.trainers.bert_interop import export_bert_checkpoint
from jaxllm.trainers.hf_import import import_hf
from tests.interop.conftest import write_bert_dir
from tests.interop.test_errors import TINY_LLAMA
from tests.sft.conftest import ROOT


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return write_bert_dir(tmp_path_factory.mktemp("bert") / "hf")


def _copy_with(src: Path, dst: Path, edit=lambda t: t, conf=None) -> Path:
    """Copies a HF dir, passing its tensors through `edit` and updating config.json."""
    dst.mkdir(parents=True)
    for name in ("vocab.txt", "tokenizer_config.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    config = {**json.loads((src / "config.json").read_text()), **(conf or {})}
    (dst / "config.json").write_text(json.dumps(config))
    reader = SafetensorsReader(src)
    tensors = edit({n: np.array(reader.get(n)) for n in sorted(reader.names)})
    specs = [(n, a.shape, a.dtype) for n, a in tensors.items()]
    write_safetensors(dst / "model.safetensors", specs, tensors.__getitem__)
    return dst


def _error(fn, *args, **kw) -> str:
    with pytest.raises(JaxllmError) as info:
        fn(*args, **kw)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def _import(path: Path, tmp_path: Path) -> str:
    return _error(import_hf, path, tmp_path / "run", from_dict({"stage": "import"}))


def test_unsupported_architecture(bert_dir, tmp_path):
    d = _copy_with(bert_dir, tmp_path / "qa", conf={"architectures": ["BertForQuestionAnswering"]})
    msg = _import(d, tmp_path)
    assert "'BertForQuestionAnswering' unsupported" in msg and "BertForMaskedLM" in msg
    assert "config.json" in msg


def test_unsupported_config_values(bert_dir, tmp_path):
    d = _copy_with(bert_dir, tmp_path / "act", conf={"hidden_act": "gelu_new"})
    assert "hidden_act 'gelu_new' unsupported" in _import(d, tmp_path)
    d = _copy_with(bert_dir, tmp_path / "rel", conf={"position_embedding_type": "relative_key"})
    assert "position_embedding_type 'relative_key'" in _import(d, tmp_path)


def test_missing_and_unexpected_tensors(bert_dir, tmp_path):
    name = "encoder.layer.1.intermediate.dense.weight"
    d = _copy_with(bert_dir, tmp_path / "miss", lambda t: {k: v for k, v in t.items() if k != name})
    assert f"missing tensor '{name}'" in _import(d, tmp_path)
    extra = "cls.seq_relationship.weight"  # a head the config's BertModel does not have
    d = _copy_with(bert_dir, tmp_path / "extra", lambda t: {**t, extra: np.zeros((2, 32), "f4")})
    assert f"unexpected tensor '{extra}'" in _import(d, tmp_path)
    name = "encoder.layer.0.attention.self.key.weight"
    d = _copy_with(bert_dir, tmp_path / "shape", lambda t: {**t, name: np.zeros((8, 32), "f4")})
    assert f"'{name}' has shape (8, 32), expected (32, 32)" in _import(d, tmp_path)


def test_classifier_without_its_head(bert_dir, tmp_path):
    conf = {"architectures": ["BertForSequenceClassification"]}
    d = _copy_with(bert_dir, tmp_path / "cls", conf=conf)
    assert "missing tensor 'classifier.weight'" in _import(d, tmp_path)


def test_vocab_without_a_special_token(bert_dir, tmp_path):
    d = _copy_with(bert_dir, tmp_path / "vocab")
    vocab = (d / "vocab.txt").read_text().replace("[MASK]\n", "")
    (d / "vocab.txt").write_text(vocab)
    msg = _import(d, tmp_path)
    assert "vocab.txt" in msg and "'[MASK]'" in msg


def test_round_trip_without_torch(bert_dir, tmp_path):
    """import → export gives back every tensor exactly, tokenizer files included."""
    summary = import_hf(bert_dir, tmp_path / "run", from_dict({"stage": "import"}))
    assert summary["architecture"] == "BertModel" and summary["fresh_params"] == []
    out = tmp_path / "out"
    export_bert_checkpoint(Path(summary["outputs"]["checkpoint"]), out)
    a, b = SafetensorsReader(bert_dir), SafetensorsReader(out)
    assert a.names == b.names
    for name in a.names:
        np.testing.assert_array_equal(a.get(name), b.get(name), err_msg=name)
    assert (out / "vocab.txt").read_text() == (bert_dir / "vocab.txt").read_text()
    conf = json.loads((out / "config.json").read_text())
    assert conf["architectures"] == ["BertModel"] and conf["vocab_size"] == 117
    msg = _error(export_bert_checkpoint, tmp_path / "run/checkpoints", tmp_path / "x",
                 architecture="BertForSequenceClassification")  # fmt: skip
    assert "encoder checkpoint cannot be written as BertForSequenceClassification" in msg


def test_legacy_tensor_names(bert_dir, tmp_path):
    """TF-era names (LayerNorm gamma/beta, the MLM bias as `cls.predictions.decoder.bias`)
    import as their modern spellings do."""

    def legacy(t: dict) -> dict:
        out = {}
        for k, v in t.items():
            k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
                "LayerNorm.bias", "LayerNorm.beta"
            )
            out["bert." + k] = v
        d = out["bert.embeddings.word_embeddings.weight"].shape[1]
        rng = np.random.default_rng(0)
        for name, shape in (("dense.weight", (d, d)), ("dense.bias", (d,)),
                            ("LayerNorm.gamma", (d,)), ("LayerNorm.beta", (d,))):  # fmt: skip
            out[f"cls.predictions.transform.{name}"] = rng.normal(size=shape).astype("f4")
        out["cls.predictions.decoder.bias"] = rng.normal(size=117).astype("f4")
        out["cls.predictions.decoder.weight"] = out["bert.embeddings.word_embeddings.weight"]
        return out

    conf = {"architectures": ["BertForMaskedLM"]}
    d = _copy_with(bert_dir, tmp_path / "legacy", legacy, conf)
    summary = import_hf(d, tmp_path / "run", from_dict({"stage": "import"}))
    assert summary["architecture"] == "BertForMaskedLM"
    out = tmp_path / "out"
    export_bert_checkpoint(Path(summary["outputs"]["checkpoint"]), out)
    a, b = SafetensorsReader(d), SafetensorsReader(out)
    assert summary["fresh_params"] == ["nsp.bias", "nsp.kernel"]  # the pooler was saved, NSP not
    assert "cls.predictions.bias" in b.names and "cls.seq_relationship.bias" not in b.names
    for name in b.names:
        old = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        )
        old = "cls.predictions.decoder.bias" if name == "cls.predictions.bias" else old
        np.testing.assert_array_equal(a.get(old), b.get(name), err_msg=name)


def test_decoder_checkpoint_to_bert_export_and_embed(tmp_path, capsys):
    """A decoder checkpoint is refused by BERT export and by stage embed, in one line."""
    hf = export_hf(nnx.state(make_decoder(TINY_LLAMA, seed=1)), TINY_LLAMA, tmp_path / "llama")
    import_hf(hf, tmp_path / "run", from_dict({"stage": "import"}))
    ckpt = tmp_path / "run/checkpoints"
    msg = _error(export_bert_checkpoint, ckpt, tmp_path / "out", architecture="BertModel")
    assert str(ckpt) in msg and "decoder" in msg and "BERT export needs an encoder" in msg
    args = ["--config", str(ROOT / "configs/hf_export.yaml"), "--set", f"inputs.checkpoint={ckpt}",
            "--set", f"output_dir={tmp_path / 'exp'}", "--set", "hf.architecture=BertModel"]  # fmt: skip
    assert main(args) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "BERT export needs an encoder" in err[-1]
    args = ["--config", str(ROOT / "configs/embed.yaml"), "--set", f"inputs.checkpoint={ckpt}",
            "--set", f"output_dir={tmp_path / 'emb'}"]  # fmt: skip
    assert main(args) != 0
    assert "stage embed needs an encoder" in capsys.readouterr().err
