"""BERT parity: random-weight transformers models (no downloads; every weight, biases and
norms included, drawn at random so a wrong mapping shows) → `stage: import` → hidden states,
MLM, NSP and classification logits equal to transformers' within 1e-4 in float32; export →
`from_pretrained` → the same outputs; the WordPiece tokenizer comes along with its own special
ids. Unseen shapes: vocab 117, 3 layers, 4 heads, 3 labels."""

from __future__ import annotations

import json
import types
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from jaxllm.config import MeshConfig, from_dict  # noqa: E402
from jaxllm.interop import load_tokenizer  # noqa: E402
from jaxllm.sharding import make_mesh  # noqa: E402
from jaxllm.tokenizer.wordpiece import WordPieceTokenizer  # noqa: E402
from jaxllm.trainers.bert_interop import export_bert_checkpoint  # noqa: E402
from jaxllm.trainers.encoder_model import load_encoder_model  # noqa: E402
from jaxllm.trainers.hf_import import import_hf  # noqa: E402
from tests.interop.conftest import TEXTS, write_vocab  # noqa: E402

TOL = 1e-4
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
CONF = dict(vocab_size=117, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=40, type_vocab_size=2)  # fmt: skip
ARCHS = ["BertModel", "BertForMaskedLM", "BertForPreTraining", "BertForSequenceClassification"]


def randomize(model, seed: int = 0):
    """Every parameter normal(0, 0.2) (LayerNorm scales around 1): HF's init leaves biases at
    0 and scales at 1, which would hide a wrong mapping of either."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("LayerNorm.weight") else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module", params=ARCHS)
def imported(request, tmp_path_factory):
    """(hf model, hf dir, import summary, loaded checkpoint) for one architecture."""
    t = transformers
    conf = t.BertConfig(**CONF, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    hf = randomize(getattr(t, request.param)(conf))
    tmp = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(tmp / "hf")
    write_vocab(tmp / "hf")
    summary = import_hf(tmp / "hf", tmp / "run", from_dict({"stage": "import"}))
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    loaded = load_encoder_model(Path(summary["outputs"]["checkpoint"]), mesh)
    return types.SimpleNamespace(arch=request.param, hf=hf, dir=tmp, summary=summary, ck=loaded)


def _batch(seed: int = 0):
    """Token ids, token types (sentence B from position 6) and a padding mask."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 117, (3, 12))
    types_ = np.zeros_like(ids)
    types_[:, 6:] = 1
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    return ids, types_, mask


def _hf(model, ids, types_, mask):
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                     token_type_ids=torch.tensor(types_), output_hidden_states=True)  # fmt: skip


def _ours(ck, ids, types_, mask):
    model = nnx.merge(ck.graphdef, ck.state)
    enc = getattr(model, "encoder", model)
    x = enc(ids, segment_ids_BL=mask, token_types_BL=types_)
    return model, enc, x


def test_import_matches_transformers(imported):
    ids, types_, mask = _batch()
    theirs = _hf(imported.hf, ids, types_, mask)
    model, enc, x = _ours(imported.ck, ids, types_, mask)
    real = mask.astype(bool)
    hidden = theirs.hidden_states[-1].numpy()
    diff = float(np.abs(np.asarray(x)[real] - hidden[real]).max())
    print(f"{imported.arch}: max abs hidden-state diff {diff:.2e}")
    assert diff <= TOL
    n_hf = sum(p.numel() for p in imported.hf.parameters())
    fresh = imported.summary["fresh_params"]
    if imported.arch == "BertForMaskedLM":  # no pooler or NSP head there: they start fresh
        assert fresh == ["encoder.pooler", "encoder.pooler_bias", "nsp.bias", "nsp.kernel"]
        n_hf += 32 * 32 + 32 + 32 * 2 + 2
    else:
        assert fresh == []
    assert imported.summary["params"] == n_hf
    if imported.arch == "BertModel":
        pooled = np.asarray(enc.pooled(x))
        assert np.abs(pooled - theirs.pooler_output.numpy()).max() <= TOL
    if imported.ck.kind == "pretrain":
        logits = np.asarray(model.mlm(x, enc.embed.embedding[...]))
        ref = getattr(theirs, "prediction_logits", None)
        ref = (theirs.logits if ref is None else ref).numpy()
        diff = float(np.abs(logits[real] - ref[real]).max())
        print(f"{imported.arch}: max abs MLM logit diff {diff:.2e}")
        assert diff <= TOL
    if imported.arch == "BertForPreTraining":
        nsp = np.asarray(model.nsp(enc.pooled(x)))
        assert np.abs(nsp - theirs.seq_relationship_logits.numpy()).max() <= TOL
    if imported.arch == "BertForSequenceClassification":
        logits = np.asarray(model(ids, segment_ids_BL=mask, token_types_BL=types_))
        assert np.abs(logits - theirs.logits.numpy()).max() <= TOL
        meta = imported.ck.meta
        assert meta["num_labels"] == 3 and meta["id2label"]["2"] == "positive"
        assert meta["label2id"]["neutral"] == 1


def test_export_round_trip(imported):
    """export → AutoModel*.from_pretrained → the original's outputs (labels kept)."""
    out = imported.dir / "export"
    summary = export_bert_checkpoint(imported.dir / "run/checkpoints", out)
    assert summary["architecture"] == imported.arch  # the class it was imported from
    auto = {"BertModel": transformers.AutoModel, "BertForMaskedLM": transformers.AutoModelForMaskedLM,
            "BertForPreTraining": transformers.AutoModelForPreTraining,
            "BertForSequenceClassification": transformers.AutoModelForSequenceClassification}  # fmt: skip
    back = auto[imported.arch].from_pretrained(out).eval()
    assert type(back) is type(imported.hf)
    ids, types_, mask = _batch(seed=1)
    a, b = _hf(back, ids, types_, mask), _hf(imported.hf, ids, types_, mask)
    real = mask.astype(bool)
    diff = np.abs(a.hidden_states[-1].numpy() - b.hidden_states[-1].numpy())[real].max()
    assert diff <= TOL
    if imported.arch == "BertForSequenceClassification":
        np.testing.assert_allclose(a.logits.numpy(), b.logits.numpy(), atol=TOL, rtol=0)
        assert back.config.id2label == LABELS
    if imported.arch == "BertForMaskedLM":
        assert np.abs(a.logits.numpy() - b.logits.numpy())[real].max() <= TOL
    # the tokenizer comes along: tokenizer.json and vocab.txt give the original's ids
    want = transformers.AutoTokenizer.from_pretrained(imported.dir / "hf")(TEXTS)["input_ids"]
    fast = transformers.AutoTokenizer.from_pretrained(out)
    assert fast(TEXTS)["input_ids"] == want
    (out / "tokenizer.json").unlink()  # vocab.txt alone: what a slow BertTokenizer reads
    assert transformers.BertTokenizer.from_pretrained(out)(TEXTS)["input_ids"] == want


@pytest.mark.parametrize("imported", ["BertForPreTraining"], indirect=True)
def test_pretrain_exports_as_masked_lm_or_base(imported, tmp_path):
    """`hf.architecture` writes a checkpoint as a smaller class (its heads dropped)."""
    for arch, auto in (("BertForMaskedLM", transformers.AutoModelForMaskedLM),
                       ("BertModel", transformers.AutoModel)):  # fmt: skip
        out = tmp_path / arch
        export_bert_checkpoint(imported.dir / "run/checkpoints", out, architecture=arch)
        assert json.loads((out / "config.json").read_text())["architectures"] == [arch]
        back = auto.from_pretrained(out).eval()
        ids, types_, mask = _batch(seed=2)
        got = _hf(back, ids, types_, mask).hidden_states[-1].numpy()
        want = _hf(imported.hf, ids, types_, mask).hidden_states[-1].numpy()
        assert np.abs(got - want)[mask.astype(bool)].max() <= TOL


@pytest.mark.parametrize("imported", ["BertModel"], indirect=True)
def test_tokenizer_keeps_bert_special_ids(imported):
    """vocab.txt → tokenizer.json: [UNK] [CLS] [SEP] [MASK] keep their ids (4-7 here, as
    Google's 100-103), and encode_single equals transformers' tokenizer of the same files."""
    tok = load_tokenizer(imported.summary["outputs"]["tokenizer"])
    assert isinstance(tok, WordPieceTokenizer)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 4, 5, 6, 7)
    ref = transformers.AutoTokenizer.from_pretrained(imported.dir / "hf")
    assert [tok.encode_single(t) for t in TEXTS] == ref(TEXTS)["input_ids"]
    ids, types_ = tok.encode_pair(TEXTS[0], TEXTS[1])
    enc = ref(TEXTS[0], TEXTS[1])
    assert (ids, types_) == (enc["input_ids"], enc["token_type_ids"])
