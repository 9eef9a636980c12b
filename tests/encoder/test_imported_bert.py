"""The encoder stages on an imported Hugging Face BERT whose special tokens are not at ids
0-4 (Google's vocab.txt puts [CLS] [SEP] [MASK] at 101-103): MLM pairs and masks use the
vocabulary's ids, and `stage: classify` fine-tunes the imported encoder through the CLI."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import LoaderConfig, MLMConfig, ModelConfig, from_dict
from jaxllm.data.mlm import make_mlm_dataset
from jaxllm.main import main
from jaxllm.tokenizer.hf import load_tokenizer
from jaxllm.trainers.hf_import import import_hf

from .conftest import ROOT, write_split

# [PAD]=0, unused slots, then [UNK] [CLS] [SEP] [MASK] at 4..7
WORDS = "the cat sat on a mat dog runs fast good bad very film . !"
VOCAB = ["[PAD]", "[unused0]", "[unused1]", "[unused2]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
         *WORDS.split(" ")]  # fmt: skip
M = ModelConfig(
    arch="encoder", vocab_size=len(VOCAB), d_model=16, n_layers=1, n_heads=2, d_ff=32,
    max_seq_len=32, type_vocab_size=2, norm="layernorm", norm_eps=1e-12, norm_position="post",
    mlp="gelu_exact", positions="learned", use_bias=True,
)  # fmt: skip


def hf_bert_dir(out: Path) -> Path:
    """A HF BertModel directory of a random encoder (written by jaxllm's exporter: no torch)."""
    from jaxllm.interop.bert import bert_config_json, bert_specs
    from jaxllm.interop.export import write_hf
    from jaxllm.models.encoder import make_encoder

    state = nnx.state(make_encoder(M, seed=1), nnx.Param)
    spec, conf = bert_specs(M, "BertModel"), bert_config_json(M, "BertModel", "float32", None, 0)
    write_hf(state, spec, conf, out, "float32")
    (out / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    return out


@pytest.mark.slow
def test_mlm_pairs_use_the_vocabulary_special_ids(tmp_path):
    summary = import_hf(
        hf_bert_dir(tmp_path / "hf"), tmp_path / "run", from_dict({"stage": "import"})
    )
    tok = load_tokenizer(Path(summary["outputs"]["tokenizer"]))
    assert (tok.cls_id, tok.sep_id, tok.mask_id) == (5, 6, 7)
    docs = ["<s>" + " ".join(["the cat sat on a mat.", "a dog runs fast!"] * (2 + i)) + "</s>"
            for i in range(6)]  # fmt: skip
    write_split(tmp_path / "data", "train", docs)
    loader = LoaderConfig(seq_len=24, batch_size=4, shuffle=False, num_threads=1, prefetch=0)
    ds = make_mlm_dataset(sorted((tmp_path / "data/train").glob("*.jsonl")), tok, loader,
                          MLMConfig(mask_prob=0.3), seed=0)  # fmt: skip
    batch = next(iter(ds))
    real = batch["segment_ids"] > 0
    assert (batch["tokens"][:, 0] == 5).all()  # [CLS]
    assert ((batch["tokens"] == 6) & real).sum(axis=1).tolist() == [2] * 4  # two [SEP]s
    assert ((batch["tokens"] == 7) & real).any()  # [MASK]
    assert not np.isin(batch["tokens"][real], [1, 2, 3]).any()  # never jaxllm's 2/3/4
    chosen = batch["mask_targets"][batch["mask_weights"] > 0]
    assert len(chosen) and not np.isin(chosen, [0, 4, 5, 6, 7]).any()  # specials never chosen


@pytest.mark.slow  # ~30 s: import, then classify through the CLI
def test_classify_fine_tunes_an_imported_bert(tmp_path, capsys):
    summary = import_hf(
        hf_bert_dir(tmp_path / "hf"), tmp_path / "run", from_dict({"stage": "import"})
    )
    rows = [{"text": t, "label": lab} for t, lab in
            [("good film", "pos"), ("very good", "pos"), ("bad film", "neg"), ("very bad", "neg")]]  # fmt: skip
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    out = tmp_path / "cls"
    sets = {"output_dir": out, "progress": "false",
            "inputs.checkpoint": summary["outputs"]["checkpoint"],
            "classify.train_file": data, "classify.val_file": data, "classify.test_file": "''",
            "classify.labels": "[neg, pos]", "loader.seq_len": 16, "loader.batch_size": 8,
            "train.steps": 3, "train.eval_every": 3, "train.checkpoint_every": 3}  # fmt: skip
    args = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    assert main(["--config", str(ROOT / "configs/tiny_classify.yaml"), *args]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["init"] == "checkpoint" and s["examples"] == {"train": 16, "val": 16}
    assert s["total_params"] > 0 and len(s["val_confusion"]) == 2
    assert jax.process_count() == 1
