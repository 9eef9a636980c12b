"""`curate` end to end on small files: markers, dedup, mixing, splits, determinism, bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from jaxllm.config import DataConfig, DedupConfig, FilterConfig, SourceConfig
from jaxllm.data.curate import curate
from jaxllm.data.sources import ErrorLog, cleaned_shards, iter_cleaned, read_source
from jaxllm.errors import DataError

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
WORDS += ["iota", "kappa", "lambda", "mu", "nu", "xi", "pi", "rho"]


def unique_docs(n: int, seed: int = 0) -> list[str]:
    """n documents of random words: distinct, and far from near-duplicates of each other."""
    rng = np.random.default_rng(seed)
    return [f"doc {seed}-{i}: " + " ".join(rng.choice(WORDS, 30)) for i in range(n)]


def write_jsonl(path: Path, texts: list[str], wrap: bool = True) -> Path:
    lines = [json.dumps({"text": f"<s>{t}</s>" if wrap else t}, ensure_ascii=False) for t in texts]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def config(*sources: SourceConfig, near: bool = True, **kw) -> DataConfig:
    kw.setdefault("val_fraction", 0.0)
    return DataConfig(sources=sources, dedup=DedupConfig(near=near), **kw)


def texts_of(out: Path, split: str) -> list[str]:
    return [r["text"] for r in iter_cleaned(out, split)]


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/shard-*.jsonl"))}


# ----------------------------------------------------------------------------- basics


def test_markers_normalisation_and_report(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", ["cafe\u0301  \r\nline", "plain"], wrap=False)
    write_jsonl(tmp_path / "b.jsonl", ["<s>already wrapped</s>"], wrap=False)
    cfg = config(SourceConfig(str(src)), SourceConfig(str(tmp_path / "b.jsonl"), name="bee"))
    report = curate(cfg, tmp_path / "out", seed=0, progress=False)
    records = list(iter_cleaned(tmp_path / "out", "train"))
    assert records == [
        {"text": "<s>caf\u00e9\nline</s>", "source": "a"},
        {"text": "<s>plain</s>", "source": "a"},
        {"text": "<s>already wrapped</s>", "source": "bee"},
    ]
    assert report["sources"]["a"]["docs_in"] == 2
    assert report["sources"]["bee"]["train"] == {"docs": 1, "chars": len("already wrapped")}
    on_disk = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert report["lsh"]["bands"] * report["lsh"]["rows"] <= 128
    assert report["totals"]["train_docs"] == 3 and report["mb_per_s"] > 0
    assert not (tmp_path / "out" / ".curate-tmp").exists()


def test_text_gzip_and_glob_sources(tmp_path):
    (tmp_path / "c.txt").write_text("first doc\nline two\n\n\n  \nsecond doc\n", encoding="utf-8")
    with gzip.open(tmp_path / "d-1.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write('{"body": "from gz"}\n')
    write_jsonl(tmp_path / "d-2.json", ["from json"])  # .json reads as JSONL
    cfg = config(
        SourceConfig(str(tmp_path / "c.txt")),
        SourceConfig(str(tmp_path / "d-*"), name="d", text_key="body", format="auto"),
        SourceConfig(str(tmp_path / "d-2.json"), name="d2"),
    )
    report = curate(cfg, tmp_path / "out", seed=0, progress=False)
    assert texts_of(tmp_path / "out", "train") == [
        "<s>first doc\nline two</s>",
        "<s>second doc</s>",
        "<s>from gz</s>",
        "<s>from json</s>",
    ]
    assert report["sources"]["d"]["files"] == 2
    assert report["sources"]["d"]["errors"] == {"missing_text": 1}  # d-2.json has no "body"


def test_asset_source_reads_the_shipped_corpus():
    errors = ErrorLog()
    docs = list(read_source(SourceConfig("asset:corpus/song100.jsonl.gz"), errors))
    assert len(docs) == 96 and docs[0].text.startswith("<s>") and not errors.counts


def test_exact_and_near_dedup_counts(tmp_path):
    docs = unique_docs(50)
    near = docs[3].replace("doc 0-3:", "doc 0-3 copy:")  # one small edit: Jaccard ~0.9
    dup = docs[5] + "   \n\n\n"  # equal after normalisation
    src = write_jsonl(tmp_path / "a.jsonl", [*docs, near, dup])
    report = curate(config(SourceConfig(str(src))), tmp_path / "out", seed=0, progress=False)
    assert report["sources"]["a"]["exact_dups"] == 1
    assert report["sources"]["a"]["near_dups"] == 1
    assert texts_of(tmp_path / "out", "train") == [f"<s>{d}</s>" for d in docs]
    report = curate(config(SourceConfig(str(src)), near=False), tmp_path / "o2", seed=0)
    assert report["totals"]["near_dups"] == 0 and report["totals"]["train_docs"] == 51


def test_shards_split_at_shard_docs_and_stale_shards_go(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", unique_docs(25))
    out = tmp_path / "out"
    curate(config(SourceConfig(str(src)), shard_docs=4), out, seed=0, progress=False)
    assert [len(p.read_text().splitlines()) for p in cleaned_shards(out, "train")] == [4] * 6 + [1]
    curate(config(SourceConfig(str(src)), shard_docs=10), out, seed=0, progress=False)
    assert len(cleaned_shards(out, "train")) == 3
    assert cleaned_shards(out, "val") == []
    with pytest.raises(DataError, match="no such split"):
        cleaned_shards(out, "test")


def test_zero_survivors_names_the_filter(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", unique_docs(5))
    cfg = config(SourceConfig(str(src)), filters=FilterConfig(min_chars=10_000))
    with pytest.raises(DataError, match=r"5 were dropped by filter data\.filters\.min_chars"):
        curate(cfg, tmp_path / "out", seed=0, progress=False)
    assert not (tmp_path / "out" / ".curate-tmp").exists()


def test_surrogate_pairs_and_escaped_backslashes_are_kept(tmp_path):
    """Only a lone surrogate is bad text (see test_bad_input_*); a pair escapes one character
    and `\\\\ud800` is a backslash followed by letters."""
    (tmp_path / "a.jsonl").write_text(
        '{"text": "smile \\ud83d\\ude00"}\n{"text": "not \\\\ud800 one"}\n', encoding="utf-8"
    )
    report = curate(config(SourceConfig(str(tmp_path / "a.jsonl"))), tmp_path / "out", 0, False)
    assert texts_of(tmp_path / "out", "train") == [
        "<s>smile \U0001f600</s>",
        "<s>not \\ud800 one</s>",
    ]
    assert report["errors"]["counts"] == {}


# ----------------------------------------------------------------------------- mixing and splits


def test_mixing_weights(tmp_path):
    n = 2000
    srcs = [
        SourceConfig(str(write_jsonl(tmp_path / f"{name}.jsonl", unique_docs(n, i))), weight=w)
        for i, (name, w) in enumerate([("third", 0.3), ("double", 2.0), ("none", 0.0)])
    ]
    report = curate(config(*srcs, near=False), tmp_path / "out", seed=0, progress=False)
    kept = report["sources"]["third"]["train"]["docs"]
    assert abs(kept - 0.3 * n) <= 5 * np.sqrt(n * 0.3 * 0.7)
    assert report["sources"]["double"]["train"]["docs"] == 2 * n
    assert report["sources"]["none"]["train"]["docs"] == 0
    train = texts_of(tmp_path / "out", "train")
    assert all(train.count(f"<s>{d}</s>") == 2 for d in unique_docs(n, 1)[:50])
    assert report["weights"]["double"]["effective_weight"] == 2.0


def test_split_fraction_disjoint_and_copies_stay_in_their_split(tmp_path):
    n = 2000
    src = write_jsonl(tmp_path / "a.jsonl", unique_docs(n))
    cfg = config(SourceConfig(str(src), weight=2.0), val_fraction=0.2, near=False)
    curate(cfg, tmp_path / "out", seed=0, progress=False)
    train, val = texts_of(tmp_path / "out", "train"), texts_of(tmp_path / "out", "val")
    assert abs(len(val) - 0.2 * n) <= 5 * np.sqrt(n * 0.2 * 0.8)
    assert len(set(val)) == len(val)  # val is not upsampled
    assert not set(train) & set(val)
    assert len(train) == 2 * (n - len(val))


def test_determinism_and_seed(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", unique_docs(300))
    cfg = config(SourceConfig(str(src), weight=1.5), val_fraction=0.2)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        curate(cfg, tmp_path / name, seed=seed, progress=False)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    assert set(texts_of(tmp_path / "a", "val")) != set(texts_of(tmp_path / "c", "val"))


# ----------------------------------------------------------------------------- bad input

GOOD = b'{"text": "a good document"}\n'
DEEP_150 = b"[" * 150 + b"]" * 150  # parses in Python, but deeper than jsonl.MAX_DEPTH
BAD_INPUTS = {  # case: (error kind, file content or None for no file, line of the problem)
    "malformed_json": ("bad_json", GOOD + b'{"text": "unterminated\n', 2),
    "not_an_object": ("not_object", GOOD + b"[1, 2]\n", 2),
    "missing_text_key": ("missing_text", GOOD + b'{"body": "x"}\n', 2),
    "text_not_a_string": ("missing_text", GOOD + GOOD + b'{"text": 5}\n', 3),
    "invalid_utf8": ("bad_utf8", GOOD + b'{"text": "caf\xe9"}\n', 2),
    "utf8_encoded_surrogate": ("bad_utf8", GOOD + b'{"text": "a \xed\xa0\x80 b"}\n', 2),
    "lone_surrogate_escape": ("bad_unicode", GOOD + b'{"text": "bad \\ud800 char"}\n', 2),
    "lone_surrogate_in_key": ("bad_unicode", GOOD + b'{"text": "x", "\\udfff": 1}\n', 2),
    "nested_100k_brackets": ("too_deep", GOOD + b"[" * 100_000 + b"]" * 100_000 + b"\n", 2),
    "nested_150_in_object": ("too_deep", GOOD + b'{"text": "x", "m": ' + DEEP_150 + b"}\n", 2),
    "integer_of_5000_digits": ("bad_json", GOOD + b'{"text": "x", "n": ' + b"7" * 5000 + b"}\n", 2),
    "empty_file": ("empty_file", b"", 0),
    "missing_file": ("missing_file", None, 0),
}


def _bad_source(tmp_path: Path, case: str) -> tuple[str, str, str]:
    kind, body, line = BAD_INPUTS[case]
    path = tmp_path / "a.jsonl"
    if body is not None:
        path.write_bytes(body)
    return kind, str(path), f"{path}:{line}"


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_skip_is_counted_with_file_and_line(tmp_path, case):
    kind, path, where = _bad_source(tmp_path, case)
    good = write_jsonl(tmp_path / "good.jsonl", ["fine"])
    cfg = config(SourceConfig(path, name="bad"), SourceConfig(str(good)))
    report = curate(cfg, tmp_path / "out", seed=0, progress=False)
    assert report["errors"]["counts"] == {kind: 1}
    assert report["sources"]["bad"]["errors"] == {kind: 1}
    (example,) = report["errors"]["examples"]
    assert example.startswith(f"{where}: ")
    good_in_bad = report["sources"]["bad"]["train"]["docs"]
    assert good_in_bad == {"empty_file": 0, "missing_file": 0}.get(kind, 1)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fail_raises_one_line(tmp_path, case):
    _, path, where = _bad_source(tmp_path, case)
    cfg = config(SourceConfig(path), on_error="fail")
    with pytest.raises(DataError) as e:
        curate(cfg, tmp_path / "out", seed=0, progress=False)
    assert str(e.value).startswith(f"{where}: ")
    assert "\n" not in str(e.value)


def test_bad_utf8_in_plain_text_names_the_line(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"good one\n\nbad\nbyte \xff here\n\nlast\n")
    errors = ErrorLog()
    docs = list(read_source(SourceConfig(str(tmp_path / "t.txt")), errors))
    assert [d.text.strip() for d in docs] == ["good one", "last"]
    assert errors.examples[0].startswith(f"{tmp_path / 't.txt'}:4: invalid UTF-8")


def test_truncated_gzip_is_reported(tmp_path):
    data = gzip.compress(GOOD * 2000)
    (tmp_path / "a.jsonl.gz").write_bytes(data[: len(data) // 2])
    errors = ErrorLog()
    docs = list(read_source(SourceConfig(str(tmp_path / "a.jsonl.gz")), errors))
    assert 0 < len(docs) < 2000 and errors.counts == {"bad_gzip": 1}
    assert errors.examples[0].startswith(f"{tmp_path / 'a.jsonl.gz'}:{len(docs) + 1}: corrupt")


def test_error_log_keeps_counts_but_few_examples(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b"oops\n" * 80 + GOOD)
    errors = ErrorLog(max_examples=50)
    assert len(list(read_source(SourceConfig(str(tmp_path / "a.jsonl")), errors))) == 1
    assert errors.to_dict()["counts"] == {"bad_json": 80}
    assert len(errors.examples) == 50 and errors.to_dict()["examples_left_out"] == 30
