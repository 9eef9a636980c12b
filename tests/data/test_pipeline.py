"""Tests for the JSONL source and the packed LM pipeline, with a fake word-level tokenizer.

Every document token is unique ("t<n>" → id n + 10), so a (input, target) pair names the exact
document and position it came from: the tests check identity, not just counts.
"""

from __future__ import annotations

import collections
import json
import pickle
import re
from pathlib import Path

import grain
import numpy as np
import pytest

from jaxllm.config import LoaderConfig
from jaxllm.data.jsonl_source import JsonlSource
from jaxllm.data.pipeline import (
    BATCH_KEYS,
    find_shards,
    make_eval_dataset,
    make_lm_dataset,
)
from jaxllm.errors import ConfigError, DataError

BOS, EOS = 2, 3


class WordTokenizer:
    """`<s>` → 2, `</s>` → 3 (with `specials`), `t<n>` → n + 10."""

    bos_id, eos_id = BOS, EOS

    def encode(self, text: str, add_bos=False, add_eos=False, specials=True) -> list[int]:
        ids = []
        for w in re.findall(r"<s>|</s>|[^\s<]+", text):
            assert specials or w not in ("<s>", "</s>"), "no marker reaches a plain encode"
            ids.append(BOS if w == "<s>" else EOS if w == "</s>" else int(w[1:]) + 10)
        return [BOS] * add_bos + ids + [EOS] * add_eos

    def encode_batch(self, texts, add_bos=False, add_eos=False, num_threads=2, specials=True):
        return [self.encode(t, add_bos, add_eos, specials) for t in texts]


def make_docs(n: int, seed: int, max_words: int = 40, words: int | None = None) -> list[list[int]]:
    """Token ids of n documents with unique content tokens; `words` fixes every length."""
    rng = np.random.default_rng(seed)
    docs, next_id = [], 100
    for _ in range(n):
        k = words if words is not None else int(rng.integers(1, max_words + 1))
        docs.append([BOS, *range(next_id, next_id + k), EOS])
        next_id += k
    return docs


def write_shards(
    data_dir: Path, docs: list[list[int]], n_shards: int = 3, extra: tuple[str, ...] = ()
) -> list[Path]:
    """Writes docs round-robin to shards; `extra` texts (no targets) go to the first shard."""
    split = data_dir / "train"
    split.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with open(split / f"shard-{s:05d}.jsonl", "w") as f:
            texts = ["<s>" + " ".join(f"t{i - 10}" for i in d[1:-1]) + "</s>" for d in docs]
            for text in texts[s::n_shards] + list(extra) * (s == 0):
                f.write(json.dumps({"text": text, "source": "test"}) + "\n")
    return find_shards(data_dir, "train")


def expected_pairs(docs: list[list[int]]) -> collections.Counter:
    return collections.Counter((a, b) for d in docs for a, b in zip(d[:-1], d[1:]))


def take(ds, n: int | None = None) -> list[dict[str, np.ndarray]]:
    it = iter(ds)
    out = [next(it) for _ in range(n)] if n is not None else list(it)
    it.close()
    return out


def observed_pairs(batches) -> collections.Counter:
    pairs = collections.Counter()
    for b in batches:
        m = b["loss_mask"] > 0
        pairs.update(zip(b["tokens"][m].tolist(), b["targets"][m].tolist()))
    return pairs


def doc_order(batches, first_token_doc: dict[int, int]) -> list[int]:
    """Documents in stream order, read off the target of each BOS input."""
    out = []
    for b in batches:
        rows, cols = np.nonzero((b["tokens"] == BOS) & (b["loss_mask"] > 0))
        order = np.lexsort((cols, rows))
        out += [first_token_doc[int(b["targets"][rows[i], cols[i]])] for i in order]
    return out


CFG = LoaderConfig(seq_len=16, batch_size=4, shuffle=True, num_threads=2, prefetch=2)


@pytest.fixture
def corpus(tmp_path):
    docs = make_docs(60, seed=0)
    return docs, write_shards(tmp_path, docs, extra=("", "<s></s>"))  # extras: no text


# ----------------------------------------------------------------------------- (a) packing


def test_epoch_packs_every_target_once_within_its_document(corpus):
    docs, shards = corpus
    batches = take(make_lm_dataset(shards, WordTokenizer(), CFG, seed=1, repeat=False))
    for b in batches:
        assert set(b) == set(BATCH_KEYS)
        for k, v in b.items():
            assert v.shape == (4, 16) and v.dtype == (np.float32 if k == "loss_mask" else np.int32)
    assert observed_pairs(batches) == expected_pairs(docs)
    for b in batches:
        for row in range(4):
            check_row({k: v[row] for k, v in b.items()})


def check_row(r: dict[str, np.ndarray]) -> None:
    seg, pos, tok, tgt = r["segment_ids"], r["positions"], r["tokens"], r["targets"]
    np.testing.assert_array_equal(r["loss_mask"], seg > 0)
    real = seg > 0
    assert not np.any(real[np.argmin(real) :]) or real.all(), "padding only at the row's end"
    assert not np.any(tok[~real]) and not np.any(tgt[~real]), "padding is zeros"
    ids = seg[real]
    if not len(ids):  # an all-padding row of the last batch
        return
    assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
    for s in np.unique(ids):
        (cols,) = np.nonzero(seg == s)
        np.testing.assert_array_equal(pos[cols], np.arange(len(cols)))  # restart at 0 per piece
        np.testing.assert_array_equal(tok[cols][1:], tgt[cols][:-1])  # one contiguous document
        assert BOS not in tok[cols][1:], "a new document always starts a new segment"
    assert np.all(pos[tok == BOS] == 0), "a document start has position 0"


def test_documents_longer_than_a_row_are_split_without_loss(tmp_path):
    docs = make_docs(5, seed=3, words=50)  # 51 pairs each, rows of 16
    shards = write_shards(tmp_path, docs, n_shards=1)
    batches = take(make_lm_dataset(shards, WordTokenizer(), CFG, seed=0, repeat=False))
    assert observed_pairs(batches) == expected_pairs(docs)


# ----------------------------------------------------------------------------- (b) state


@pytest.mark.parametrize("words", [None, 7])  # 7 words: 8 pairs fill half a row, no remainder
def test_state_json_roundtrip_restores_the_stream(tmp_path, words):
    docs = make_docs(40, seed=2, words=words)
    shards = write_shards(tmp_path, docs)
    it = iter(make_lm_dataset(shards, WordTokenizer(), CFG, seed=5))
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(5)]
    it.close()
    fresh = iter(make_lm_dataset(shards, WordTokenizer(), CFG, seed=5))
    fresh.set_state(state)
    got = [next(fresh) for _ in range(5)]
    fresh.close()
    for e, g in zip(expected, got):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(e[k], g[k], err_msg=k)


def test_grain_checkpoint_handler_restores_the_stream(tmp_path):
    """The path orbax checkpoints take: grain's handler writes the state as JSON."""
    from etils import epath

    docs = make_docs(40, seed=2, words=7)  # the packer has no remainder at row ends
    shards = write_shards(tmp_path / "data", docs)
    handler, where = grain.checkpoint.CheckpointHandler(), epath.Path(tmp_path / "ckpt")
    where.mkdir()  # orbax creates the item directory before the handler writes into it
    it = iter(make_lm_dataset(shards, WordTokenizer(), CFG, seed=5))
    for _ in range(3):
        next(it)
    handler.save(where, args=grain.checkpoint.CheckpointSave(it))
    expected = [next(it) for _ in range(5)]
    it.close()
    fresh = iter(make_lm_dataset(shards, WordTokenizer(), CFG, seed=5))
    handler.restore(where, args=grain.checkpoint.CheckpointRestore(fresh))
    got = [next(fresh) for _ in range(5)]
    fresh.close()
    assert all(np.array_equal(e[k], g[k]) for e, g in zip(expected, got) for k in BATCH_KEYS)


# ----------------------------------------------------------------------------- (c) seeds


def test_same_seed_same_batches_other_seed_other_order(corpus):
    _, shards = corpus
    a, b, c = (take(make_lm_dataset(shards, WordTokenizer(), CFG, seed=s), 6) for s in (7, 7, 8))
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in BATCH_KEYS)
    assert not all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))


# ----------------------------------------------------------------------------- (d) processes


def test_processes_read_disjoint_slices_covering_the_epoch(corpus):
    docs, shards = corpus
    parts = [
        observed_pairs(
            take(
                make_lm_dataset(
                    shards,
                    WordTokenizer(),
                    CFG,
                    seed=1,
                    process_index=i,
                    process_count=2,
                    repeat=False,
                )
            )
        )
        for i in range(2)
    ]
    assert {t for t, _ in parts[0] if t > EOS}.isdisjoint({t for t, _ in parts[1] if t > EOS})
    assert parts[0] + parts[1] == expected_pairs(docs)
    batch = take(make_lm_dataset(shards, WordTokenizer(), CFG, seed=1, process_count=2), 1)[0]
    assert batch["tokens"].shape == (2, 16)
    with pytest.raises(ConfigError, match="batch_size"):
        make_lm_dataset(shards, WordTokenizer(), CFG, seed=1, process_index=0, process_count=3)


# ----------------------------------------------------------------------------- (e) epochs


def test_each_epoch_is_a_new_permutation(corpus):
    docs, shards = corpus
    first_token_doc = {d[1]: i for i, d in enumerate(docs)}
    batches = take(make_lm_dataset(shards, WordTokenizer(), CFG, seed=3), 60)
    order = doc_order(batches, first_token_doc)
    n = len(docs)
    assert len(order) >= 2 * n
    epoch1, epoch2 = order[:n], order[n : 2 * n]
    assert sorted(epoch1) == sorted(epoch2) == list(range(n))
    assert epoch1 != epoch2 and epoch1 != list(range(n))


# ----------------------------------------------------------------------------- (f) eval


def test_eval_covers_every_target_once_with_fixed_shapes(tmp_path):
    docs = make_docs(23, seed=4)
    shards = write_shards(tmp_path, docs, n_shards=2)
    cfg = LoaderConfig(seq_len=16, batch_size=6, shuffle=True, num_threads=0, prefetch=0)
    one = take(make_eval_dataset(shards, WordTokenizer(), cfg))
    assert observed_pairs(one) == expected_pairs(docs)
    assert all(b["tokens"].shape == (6, 16) for b in one)
    assert one[-1]["loss_mask"][-1].sum() == 0, "last batch is padded with empty rows"
    again = take(make_eval_dataset(shards, WordTokenizer(), cfg))
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(one, again) for k in BATCH_KEYS)


def test_eval_processes_get_equal_batch_counts_with_num_batches(tmp_path):
    docs = make_docs(23, seed=4)
    shards = write_shards(tmp_path, docs, n_shards=2)
    kw = dict(process_count=2, num_batches=12)
    parts = [
        take(make_eval_dataset(shards, WordTokenizer(), CFG, process_index=i, **kw)) for i in (0, 1)
    ]
    assert len(parts[0]) == len(parts[1]) == 12
    assert observed_pairs(parts[0] + parts[1]) == expected_pairs(docs)
    with pytest.raises(DataError, match="num_batches"):
        take(make_eval_dataset(shards, WordTokenizer(), CFG, process_count=2, num_batches=1))


# ----------------------------------------------------------------------------- (g) JsonlSource


def test_jsonl_source_blank_lines_unicode_no_trailing_newline(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"text": "héllo"}\n\n   \n{"text": "数据 🚀"}\r\n\r\n', encoding="utf-8")
    b.write_text('\n{"text": "x", "n": 1}\n{"text": "last"}', encoding="utf-8")  # no final \n
    src = JsonlSource([a, b])
    texts = ["héllo", "数据 🚀", "x", "last"]
    assert len(src) == 4
    assert [src[i]["text"] for i in range(4)] == texts
    assert src[-1]["text"] == "last"
    with pytest.raises(IndexError):
        src[4]
    clone = pickle.loads(pickle.dumps(src))
    assert [clone[i]["text"] for i in range(4)] == texts
    assert len(JsonlSource([tmp_path / "a.jsonl", b])) == 4


def test_jsonl_source_reports_bad_lines(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n\n{"text": oops}\n{"other": 1}\n[1, 2]\n{"text": null}\n')
    src = JsonlSource([p], require=("text",))
    assert src[0] == {"text": "ok"}
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        src[1]
    with pytest.raises(DataError, match=r"bad\.jsonl:4: record has no key 'text'"):
        src[2]
    with pytest.raises(DataError, match=r"bad\.jsonl:5: JSON list, expected a JSON object"):
        src[3]
    with pytest.raises(DataError, match=r"bad\.jsonl:6: 'text' must be a string, got null"):
        src[4]
    with pytest.raises(DataError, match="not found"):
        JsonlSource([tmp_path / "missing.jsonl"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert len(JsonlSource([empty])) == 0


def test_jsonl_source_index_spans_read_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr("jaxllm.data.jsonl_source._CHUNK", 64)  # lines straddle chunk borders
    p = tmp_path / "many.jsonl"
    p.write_text(
        "".join(json.dumps({"text": f"doc {i} " + "z" * (i % 50)}) + "\n" for i in range(500))
    )
    src = JsonlSource([p])
    assert len(src) == 500
    assert all(src[i]["text"].startswith(f"doc {i} ") for i in (0, 1, 77, 250, 499))


def test_jsonl_source_skips_whitespace_lines_of_any_length(tmp_path, monkeypatch):
    """A whitespace-only line is blank however long (17+ bytes used to fail as malformed
    JSON), in chunks of any size, few or many per chunk; the records are the ones
    `read_jsonl` reads, and an indented record is kept."""
    from jaxllm.jsonl import read_jsonl

    lines = ['{"n": 0}', " " * 17, "\t" * 40, " " * 16, " \t\r\x0b\x0c" * 9, "", '{"n": 1}',
             " " * 30 + '{"n": 2}', "\r", " " * 100, '{"n": 3}']  # fmt: skip
    p = tmp_path / "ws.jsonl"
    p.write_text("\n".join(lines * 50) + "\n" + " " * 20)  # ends in a blank line, no newline
    want = [{"n": i % 4} for i in range(200)]  # by hand: 4 records in each copy of `lines`
    offsets, at = [], 0
    for line in lines * 50:
        if line.lstrip(" \t\r\x0b\x0c"):
            offsets.append(at)
        at += len(line) + 1
    assert [r for _, r in read_jsonl(p)] == want
    for chunk in (1 << 20, 64, 7):  # one chunk (many unsure lines: vectorised), small chunks
        monkeypatch.setattr("jaxllm.data.jsonl_source._CHUNK", chunk)
        src = JsonlSource([p])
        assert len(src) == 200 and [src[i] for i in range(200)] == want
        assert src._starts.tolist() == offsets
    empty = tmp_path / "blank.jsonl"
    empty.write_text(" " * 40 + "\n\t\t\n")
    with pytest.raises(DataError) as e:
        JsonlSource([empty]).require_records('{"text"}', key="x.file")
    assert str(e.value) == (
        f"config key 'x.file': {empty} holds no records; expected JSONL lines of {{\"text\"}}"
    )
    with pytest.raises(DataError, match=rf"^{re.escape(str(empty))}: no records; expected"):
        JsonlSource([empty]).require_records('{"text"}')
