"""Labelled JSONL for `stage: classify`: checks with file:line, sentence pairs, gzip, rows
as the encoder reads them, one held-out pass covering each example once on any number of
processes, and a training stream that resumes to identical batches."""

import gzip
import json

import numpy as np
import pytest

from jaxllm.config import LoaderConfig
from jaxllm.data.classify import (
    eval_batch_count,
    labels_of,
    make_classify_dataset,
    make_classify_eval_dataset,
    make_examples,
    read_labelled,
)
from jaxllm.errors import DataError
from jaxllm.tokenizer.wordpiece import CLS, SEP

LOADER = LoaderConfig(seq_len=32, batch_size=4, num_threads=1, prefetch=0)
LABELS = ("negative", "positive")


def write(path, rows, gz=False):
    text = "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                   for r in rows)  # fmt: skip
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def examples(path, labels=LABELS, source=None):
    rows, pairs = read_labelled(path)
    return make_examples(rows, path, labels, pairs, source or path), pairs


def test_records_become_examples_and_gzip_reads(tmp_path):
    rows = [{"text": "好书", "label": "positive"}, {"text": "太差了", "label": "negative"}, "",
            {"text": "还行", "label": "positive", "extra": 1}]  # fmt: skip
    for gz in (False, True):
        path = write(tmp_path / ("a.jsonl.gz" if gz else "a.jsonl"), rows, gz)
        exs, pairs = examples(path)
        assert not pairs and [e.label for e in exs] == [1, 0, 1]
        assert [e.line for e in exs] == [1, 2, 4] and [e.index for e in exs] == [0, 1, 2]
        assert labels_of(read_labelled(path)[0], path) == LABELS
    ints = write(tmp_path / "i.jsonl", [{"text": "x", "label": n} for n in ("10", "2", "1")], False)
    assert labels_of(read_labelled(ints)[0], ints) == ("1", "2", "10")  # by number


@pytest.mark.parametrize(
    "row, message",
    [
        ({"text": "ok", "label": "neutral"}, "label 'neutral' is not one of classify.labels"),
        ({"text": "   ", "label": "positive"}, "empty 'text'"),
        ({"label": "positive"}, "record has no key 'text'"),
        ({"text": "ok"}, "record has no key 'label'"),
        ({"text": 5, "label": "positive"}, "'text' must be a string"),
        ({"text": "ok", "label": True}, "'label' must be a string or an integer"),
        ({"text": "ok", "text_pair": "x", "label": "positive"}, "record has 'text_pair'"),
        ('{"text": "cut', "malformed JSON"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, row, message):
    path = write(tmp_path / "bad.jsonl", [{"text": "fine", "label": "negative"}, row])
    with pytest.raises(DataError, match=message) as e:
        examples(path)
    assert f"{path}:2:" in str(e.value) and "\n" not in str(e.value)


def test_pair_files_need_text_pair_on_every_record(tmp_path):
    good = write(tmp_path / "p.jsonl", [{"text": "a", "text_pair": "b", "label": "positive"}])
    exs, pairs = examples(good)
    assert pairs and exs[0].pair == "b"
    bad = write(tmp_path / "q.jsonl", [{"text": "a", "text_pair": "b", "label": "positive"},
                                       {"text": "c", "label": "negative"}])  # fmt: skip
    with pytest.raises(DataError, match=f"{bad}:2: record has no 'text_pair'"):
        examples(bad)
    # a val file is checked against the training file's kind
    rows, _ = read_labelled(write(tmp_path / "v.jsonl", [{"text": "c", "label": "negative"}]))
    with pytest.raises(DataError, match="v.jsonl:1: record has no 'text_pair'"):
        make_examples(rows, tmp_path / "v.jsonl", LABELS, True, good)
    empty = write(tmp_path / "e.jsonl", [])
    with pytest.raises(DataError, match="no records"):
        read_labelled(empty)


def test_rows_single_and_pair(tmp_path, wp_tok):
    path = write(tmp_path / "p.jsonl", [{"text": "好书", "text_pair": "太差了", "label": 1},
                                        {"text": "长" * 50, "text_pair": "短", "label": 0}])  # fmt: skip
    exs, _ = examples(path, labels=("0", "1"))
    batch = next(iter(make_classify_eval_dataset(exs, wp_tok, LOADER)))
    a, b = wp_tok.encode("好书"), wp_tok.encode("太差了")
    n = len(a) + len(b) + 3
    assert batch["tokens"][0, :n].tolist() == [CLS, *a, SEP, *b, SEP]
    assert batch["token_types"][0, :n].tolist() == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    assert batch["segment_ids"][0].sum() == n and batch["segment_ids"][1].sum() == 32
    assert batch["labels"].tolist()[:2] == [1, 0] and batch["index"].tolist() == [0, 1, -1, -1]
    assert batch["weights"].tolist() == [1, 1, 0, 0]


def test_held_out_pass_covers_every_example_once_on_many_processes(tmp_path, wp_tok):
    rows = [{"text": f"第{i}条", "label": LABELS[i % 2]} for i in range(11)]
    exs, _ = examples(write(tmp_path / "v.jsonl", rows))
    for pc in (1, 2, 4):
        count = eval_batch_count(len(exs), LOADER, pc)
        seen = []
        for pi in range(pc):
            batches = list(make_classify_eval_dataset(
                exs, wp_tok, LOADER, process_index=pi, process_count=pc, num_batches=count
            ))  # fmt: skip
            assert len(batches) == count  # the same number everywhere: collective steps
            for b in batches:
                assert b["tokens"].shape == (4 // pc, 32)
                seen += b["index"][b["weights"] > 0].tolist()
        assert sorted(seen) == list(range(11))


def test_training_stream_resumes_to_identical_batches(tmp_path, wp_tok):
    rows = [{"text": f"评论{i}很好" if i % 2 else f"评论{i}很差", "label": LABELS[i % 2]}
            for i in range(9)]  # fmt: skip
    exs, _ = examples(write(tmp_path / "t.jsonl", rows))
    it = iter(make_classify_dataset(exs, wp_tok, LOADER, seed=0))
    for _ in range(5):  # past the first epoch
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(3)]
    again = iter(make_classify_dataset(exs, wp_tok, LOADER, seed=0))
    again.set_state(state)
    for w in want:
        got = next(again)
        assert all(np.array_equal(got[k], w[k]) for k in w)
    epoch = [i for b in [next(iter(make_classify_dataset(exs, wp_tok, LOADER, seed=0)))]
             for i in b["index"]]  # fmt: skip
    assert len(set(epoch)) == 4  # shuffled rows, all real (the stream repeats)


def test_exported_classifier_names_its_labels():
    from jaxllm.trainers.bert_interop import _labels

    trained = {"head": {"kind": "classify", "labels": ["negative", "positive"]}}
    assert _labels(trained, 2) == ["negative", "positive"]  # a stage: classify run's labels
    imported = {"id2label": {"1": "pos", "0": "neg"}, **trained}
    assert _labels(imported, 2) == ["neg", "pos"]  # an imported classifier's own names
    assert _labels({}, 2) == ["LABEL_0", "LABEL_1"]


def test_a_one_label_training_file_or_an_empty_split_is_refused(tmp_path):
    """`classify.labels: []` reads the labels from the training file: one label there is the
    same error as one in the config (it trained a 1-class model); an empty split names its key."""
    from jaxllm.config import ClassifyConfig
    from jaxllm.trainers.classify import read_splits

    one = write(tmp_path / "one.jsonl", [{"text": t, "label": "positive"} for t in "abc"])
    c = ClassifyConfig(train_file=str(one), val_file="", test_file="", labels=())
    with pytest.raises(DataError) as e:
        read_splits(c)
    assert str(e.value) == (
        f"config key 'classify.train_file': every record of {one} has the label 'positive'; "
        "a classifier needs at least two labels (add records of another)"
    )
    two = write(tmp_path / "two.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 0}])
    empty = write(tmp_path / "empty.jsonl", ["", " " * 30])
    splits, labels, _ = read_splits(ClassifyConfig(train_file=str(two), val_file="",
                                                   test_file="", labels=()))  # fmt: skip
    assert labels == ("0", "1") and [e.label for e in splits["train"]] == [1, 0]
    for split in ("val", "test"):
        c = ClassifyConfig(train_file=str(two), labels=(), **{"val_file": "", "test_file": "",
                                                              f"{split}_file": str(empty)})  # fmt: skip
        with pytest.raises(DataError) as e:
            read_splits(c)
        assert str(e.value) == (
            f"config key 'classify.{split}_file': {empty} holds no records; expected JSONL "
            "lines of {'text', 'label'}"
        )
