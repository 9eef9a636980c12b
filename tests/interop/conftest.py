"""Helpers for the BERT interop and embed tests: a tiny WordPiece `vocab.txt` laid out like
Google's (specials not at ids 0-4), and HF BERT directories written without torch."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxllm.config import ModelConfig

# [PAD]=0, then unused slots, then [UNK] [CLS] [SEP] [MASK] at 4..7 (BERT: 0, 100..103)
SPECIALS = ["[PAD]", "[unused0]", "[unused1]", "[unused2]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORDS = "the cat sat on a mat dog runs fast hello world jax dense search over text , . !"
WORDS = [*_WORDS.split(), "play", "##s", "##ing", "##ed", "re", "##trie", "##val", "new", "york"]
TEXTS = [
    "The cat sat on the mat.",
    "Hello, world!",
    "Dense retrieval: searching over text in New York City, fast.",
    "a dog",
    "Playing jax",
]
# vocab 117 (a multiple of nothing), 3 layers, 4 heads, positions 40
TINY_BERT = ModelConfig(
    arch="encoder", vocab_size=117, d_model=32, n_layers=3, n_heads=4, d_ff=48, max_seq_len=40,
    type_vocab_size=2, norm="layernorm", norm_eps=1e-12, norm_position="post",
    mlp="gelu_exact", positions="learned", use_bias=True, init_std=0.3,
)  # fmt: skip


def write_vocab(directory: Path, lowercase: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join([*SPECIALS, *WORDS]) + "\n", encoding="utf-8")
    conf = {"do_lower_case": lowercase, "tokenizer_class": "BertTokenizer"}
    (directory / "tokenizer_config.json").write_text(json.dumps(conf))
    return directory / "vocab.txt"


def write_bert_dir(out: Path, m: ModelConfig = TINY_BERT, seed: int = 1, arch="BertModel") -> Path:
    """A HF BertModel directory (config.json + model.safetensors + vocab.txt) of a random
    jaxllm encoder, written by our own exporter: no torch needed."""
    from jaxllm.interop.bert import bert_config_json, bert_specs
    from jaxllm.interop.export import write_hf
    from jaxllm.models.encoder import make_encoder

    state = nnx.state(make_encoder(m, seed=seed), nnx.Param)
    rng = np.random.default_rng(seed)  # biases and norms too: a wrong mapping shows
    state = jax.tree.map(lambda x: x + rng.normal(0, 0.2, x.shape).astype(x.dtype), state)
    write_hf(state, bert_specs(m, arch), bert_config_json(m, arch, "float32", None, 0), out,
             "float32")  # fmt: skip
    write_vocab(out)
    return out
