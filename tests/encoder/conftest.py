"""Shared fixtures for the encoder stages: a small WordPiece tokenizer, a cleaned-corpus data
directory cut from the shipped corpus, and a tiny encoder pretrained a few steps by `stage:
mlm` (the start of the classify tests)."""

import gzip
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "jaxllm" / "assets"
TINY_ENCODER = {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "max_seq_len": 64}
# Documents of one repeated Chinese character each: a pair's characters say which
# documents its two sentences came from.
MARKERS = "天地玄黄宇宙洪荒日月盈昃辰宿列张寒来暑往秋收冬藏"


def gz_rows(path: Path, limit: int) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(limit), f)]


def corpus_texts() -> list[str]:
    """Cleaned-corpus texts (`<s>…</s>`) of a few sources of the shipped corpus."""
    rows = []
    for name, n in (("kjv", 12), ("jargon", 120), ("tang300", 80)):
        rows += gz_rows(ASSETS / "corpus" / f"{name}.jsonl.gz", n)
    return [r["text"] for r in rows]


def marker_doc(char: str, sentences: int = 6) -> str:
    return "<s>" + "".join(char * (2 + i % 3) + "。" for i in range(sentences)) + "</s>"


def write_split(data_dir: Path, split: str, texts: list[str]) -> None:
    (data_dir / split).mkdir(parents=True, exist_ok=True)
    rows = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    (data_dir / split / "shard-00000.jsonl").write_text(rows, encoding="utf-8")


@pytest.fixture(scope="session")
def wp_tok(tmp_path_factory):
    """A WordPiece tokenizer (vocab 1500) trained on the corpus cut and some reviews."""
    from jaxllm.config import TokenizerConfig
    from jaxllm.tokenizer.hf import load_tokenizer
    from jaxllm.tokenizer.wordpiece import train_wordpiece

    reviews = [r["text"] for r in gz_rows(ASSETS / "sentiment" / "train.jsonl.gz", 400)]
    texts = [t.removeprefix("<s>").removesuffix("</s>") for t in corpus_texts()]
    cfg = TokenizerConfig(model_type="wordpiece", vocab_size=1500)
    path = train_wordpiece([*texts, *reviews, MARKERS], cfg, tmp_path_factory.mktemp("wp"))
    return load_tokenizer(path)


@pytest.fixture(scope="session")
def enc_data(tmp_path_factory) -> Path:
    """A `stage: data`-shaped directory: train/ and val/ shards of corpus documents (every
    7th document held out, so val has each source's share: a val set of poems alone got
    worse while 4 steps learnt mostly jargon)."""
    data = tmp_path_factory.mktemp("enc_data")
    texts = corpus_texts()
    write_split(data, "train", [t for i, t in enumerate(texts) if i % 7 != 3])
    write_split(data, "val", texts[3::7])
    return data


def mlm_sets(out: Path, data: Path, tok: Path, steps: int = 4) -> list[str]:
    sets = {
        "output_dir": out, "progress": "false", "inputs.data_dir": data,
        "inputs.tokenizer": tok, "loader.seq_len": 64, "loader.batch_size": 8,
        "train.steps": steps, "train.eval_every": 2, "train.checkpoint_every": 2,
        "train.log_every": 1, "train.eval_batches": 2,
        "train.optim.warmup_steps": 1,  # tiny_mlm.yaml's 60 would leave 4 steps at lr ~0
        # the pairs + NSP path (tiny_mlm.yaml ships nsp: false, which test_mlm_data.py and
        # the tiny_bert pipeline test cover)
        "mlm.nsp": "true",
        **{f"model.{k}": v for k, v in TINY_ENCODER.items()},
    }  # fmt: skip
    return [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]


@pytest.fixture(scope="session")
def mlm_run(tmp_path_factory, wp_tok, enc_data) -> Path:
    """The run directory of a tiny encoder pretrained 4 steps by `stage: mlm`."""
    from jaxllm.main import main

    out = tmp_path_factory.mktemp("mlm") / "run"
    args = mlm_sets(out, enc_data, wp_tok.path)
    assert main(["--config", str(ROOT / "configs/tiny_mlm.yaml"), *args]) == 0
    return out
