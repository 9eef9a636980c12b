"""`stage: mlm`'s held-out unigram baseline: fitted on every k-th train document (k = N //
_UNIGRAM_DOCS, across shards), read by index, so only the sample is ever parsed (the whole
split was read into memory before), with the same documents as before."""

import json

import numpy as np

import jaxllm.data.jsonl_source as jsonl_source
import jaxllm.jsonl as jsonl
import jaxllm.trainers.mlm as mlm

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "and",
    "runs",
    "away",
    "from",
    "hunters",
]


def test_unigram_baseline_reads_only_every_kth_document(wp_tok, tmp_path, monkeypatch):
    docs = [" ".join(WORDS[i % 7 : i % 7 + 3 + i % 5]) + "." for i in range(17)]
    (tmp_path / "train").mkdir()
    for shard, part in enumerate((docs[:11], docs[11:])):  # the sample spans both shards
        rows = "".join(json.dumps({"text": f"<s>{d}</s>"}) + "\n" for d in part)
        (tmp_path / "train" / f"shard-{shard:05d}.jsonl").write_text(rows + "\n")
    parsed = []
    for module in (jsonl, jsonl_source):  # every record parsed, by either reader
        real = module.parse_line
        monkeypatch.setattr(
            module, "parse_line", lambda raw, real=real: parsed.append(raw) or real(raw)
        )
    monkeypatch.setattr(mlm, "_UNIGRAM_DOCS", 4)
    logp = mlm.unigram_log_probs(wp_tok, tmp_path)
    picked = np.arange(17)[:: 17 // 4]  # 0 4 8 12 16
    assert len(parsed) == len(picked)  # the old code parsed all 17
    added = json.loads(wp_tok.path.read_text())["added_tokens"]  # BERT's five + any others
    special = np.zeros(wp_tok.vocab_size, bool)
    special[[t["id"] for t in added if t["special"]]] = True
    counts = np.where(special, 0.0, 1.0)
    for i in picked:
        for t in wp_tok.encode(docs[i]):
            counts[t] += 1
    counts[special] = 0
    want = np.log(np.where(special, 1.0, counts) / counts.sum())
    np.testing.assert_allclose(logp[~special], want[~special], rtol=1e-12)
    assert np.isneginf(logp[special]).all()
