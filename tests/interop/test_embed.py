"""`stage: embed`: a text's vector is the numpy mean (or [CLS] row) of the encoder's hidden
states computed separately, padding and batching change nothing, batches are split over the
mesh, and an imported sentence-transformers-style BERT gives transformers' mean-pooled
vectors."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import MeshConfig, from_dict
from jaxllm.interop import load_tokenizer
from jaxllm.sharding import make_mesh
from jaxllm.trainers import embedder as embed_mod
from jaxllm.trainers import run_stage
from jaxllm.trainers.encoder_model import load_encoder_model
from jaxllm.trainers.hf_import import import_hf
from tests.conftest import split_over_devices
from tests.interop.conftest import TEXTS, write_bert_dir, write_vocab


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory) -> Path:
    """An imported random BERT (torch-free): its run directory."""
    tmp = tmp_path_factory.mktemp("embed")
    import_hf(write_bert_dir(tmp / "hf"), tmp / "run", from_dict({"stage": "import"}))
    return tmp / "run"


def _reference(run: Path, texts: list[str], pooling: str = "mean", normalize: bool = True):
    """Each text alone, unpadded, through the encoder; pooled in numpy (float64)."""
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    graphdef, state = load_encoder_model(run / "checkpoints", mesh).encoder()
    hidden = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))  # eager ops: 6x slower
    tok = load_tokenizer(run / "tokenizer")
    out = []
    for t in texts:
        x = np.asarray(hidden(state, np.array([tok.encode_single(t)])), np.float64)[0]
        v = x.mean(axis=0) if pooling == "mean" else x[0]
        out.append(v / np.linalg.norm(v) if normalize else v)
    return np.stack(out)


def _stage(run: Path, out: Path, **embed) -> dict:
    raw = {"stage": "embed", "name": "embed", "output_dir": str(out), "progress": False,
           "inputs": {"checkpoint": str(run / "checkpoints")}, "embed": embed}  # fmt: skip
    return run_stage(from_dict(raw))


def test_embed_stage_equals_numpy_mean_over_hidden_states(bert_run, tmp_path, monkeypatch):
    calls, real = [], embed_mod.embed_batch

    def spy(graphdef, state, tokens_BL, *args):
        calls.append((tokens_BL, state))
        return real(graphdef, state, tokens_BL, *args)

    monkeypatch.setattr(embed_mod, "embed_batch", spy)
    texts_file = tmp_path / "texts.jsonl"
    texts_file.write_text("".join(json.dumps({"id": f"doc{i}", "text": t}) + "\n"
                                  for i, t in enumerate(TEXTS[2:])))  # fmt: skip
    summary = _stage(bert_run, tmp_path / "e", texts=TEXTS[:2], texts_file=str(texts_file),
                     batch_size=3)  # fmt: skip
    assert (
        summary["texts"] == 5 and summary["dim"] == 32 and summary["checkpoint_kind"] == "encoder"
    )
    for tokens, weights in calls:  # 5 texts, batches of 3: every batch split over 8 devices
        split_over_devices(tokens, weights)
    vecs = np.load(tmp_path / "e/embeddings.npy")
    assert vecs.dtype == np.float32 and vecs.shape == (5, 32)
    np.testing.assert_allclose(vecs, _reference(bert_run, TEXTS), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-6)
    index = [json.loads(x) for x in (tmp_path / "e/index.jsonl").read_text().splitlines()]
    assert [x["row"] for x in index] == list(range(5))
    assert [x["id"] for x in index] == [0, 1, "doc0", "doc1", "doc2"]
    assert [x["text"] for x in index] == TEXTS


def test_padding_and_batching_change_nothing(bert_run):
    """One text alone (bucket 16) or batched with a long one (bucket 32, padded rows), any
    batch size: the same vector. `cls` pooling and unnormalised vectors too."""
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    ck = load_encoder_model(bert_run / "checkpoints", mesh)
    graphdef, state = ck.encoder()
    tok = load_tokenizer(bert_run / "tokenizer")
    long = f"{TEXTS[2]} {TEXTS[0]}"  # its batch pads the short ones to 32 (16 alone)
    rows = [tok.encode_single(t) for t in [*TEXTS, long]]
    assert min(len(r) for r in rows) < 16 < len(rows[-1]) <= 32
    for pooling, normalize in (("mean", True), ("cls", False)):
        together = embed_mod.embed_ids(graphdef, state, rows, pooling, normalize, 6, 40)
        alone = np.concatenate(
            [embed_mod.embed_ids(graphdef, state, [r], pooling, normalize, 1, 40) for r in rows]
        )
        np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)
        ref = _reference(bert_run, [*TEXTS, long], pooling, normalize)
        np.testing.assert_allclose(together, ref, atol=1e-5, rtol=0)


def test_sentence_transformers_style_bert_matches_transformers_mean_pooling(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tests.interop.test_bert import CONF, randomize

    hf = randomize(transformers.BertModel(transformers.BertConfig(**CONF), add_pooling_layer=False))
    st = tmp_path / "st"  # a sentence-transformers directory: BertModel files at the top
    hf.save_pretrained(st)
    write_vocab(st)
    (st / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))  # fmt: skip
    (st / "1_Pooling").mkdir()
    (st / "1_Pooling/config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    summary = import_hf(st, tmp_path / "run", from_dict({"stage": "import"}))
    assert summary["fresh_params"] == ["pooler", "pooler_bias"]  # saved without a pooler
    _stage(tmp_path / "run", tmp_path / "e", texts=TEXTS, batch_size=2)
    ours = np.load(tmp_path / "e/embeddings.npy")
    tok = transformers.AutoTokenizer.from_pretrained(st)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        x = hf(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None].float()
    theirs = torch.nn.functional.normalize((x * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    diff = float(np.abs(ours - theirs).max())
    print(f"sentence embeddings: max abs diff {diff:.2e}")
    assert diff <= 1e-4
