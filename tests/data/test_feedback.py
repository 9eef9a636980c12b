"""Binary feedback for KTO: unpaired records, pairs and rankings → weighted examples →
[B, L] rows; bad records named by file:line."""

import numpy as np
import pytest

from jaxllm.data.feedback import (
    FeedbackRecords,
    make_feedback_dataset,
    make_feedback_eval_dataset,
    open_examples,
)
from jaxllm.errors import DataError
from tests.data.test_preference import LONG, RECORDS, expected_row, loader, write

UNPAIRED = [
    {"prompt": "Where is my order?", "completion": "Check My Orders, happy to help.", "label": True},
    {"prompt": "Can I pay by card?", "completion": "Read the website.", "label": False,
     "task": "service"},
    {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}],
     "completion": "Hello!", "label": True},
]  # fmt: skip


def test_records_mix_unpaired_pairs_and_rankings(tmp_path):
    """An unpaired record is one example of weight 1; a pair two (chosen desirable,
    rejected undesirable, the pair's weight); a ranking of K answers K(K-1) examples, an
    answer desirable in each pair it wins and undesirable in each it loses."""
    path = write(tmp_path / "mixed.jsonl", [UNPAIRED[0], RECORDS[0], RECORDS[1], UNPAIRED[1]])
    recs = FeedbackRecords([path])
    assert recs.unpaired and len(recs) == recs.total == 1 + 6 + 2 + 1
    got = [(recs[i].completion, recs[i].label, round(recs[i].weight, 4)) for i in range(len(recs))]
    ranked = RECORDS[0]["responses"]  # ranking [1, 2, 0]: pairs (1, 2), (1, 0), (2, 0)
    third = round(1 / 3, 4)
    assert got == [
        (UNPAIRED[0]["completion"], True, 1.0),
        (ranked[1], True, third), (ranked[2], False, third),
        (ranked[1], True, third), (ranked[0], False, third),
        (ranked[2], True, third), (ranked[0], False, third),
        ("42", True, 1.0), ("43", False, 1.0),
        (UNPAIRED[1]["completion"], False, 1.0),
    ]  # fmt: skip
    assert recs[9].task == "service" and recs[7].task == "math" and recs[5].index == 5
    assert recs[7].prompt == [{"role": "user", "content": "What is 17 + 25?"}]
    assert not FeedbackRecords([write(tmp_path / "p.jsonl", RECORDS)]).unpaired


@pytest.mark.parametrize(
    "bad,expected",
    [({"prompt": "q", "completion": "a", "label": "yes"}, '"label" must be true or false'),
     ({"prompt": "q", "completion": "a", "label": 1}, '"label" must be true or false'),
     ({"prompt": "q", "label": True}, 'expected a string "completion"'),
     ({"prompt": "q", "completion": "a"}, '"label" must be true or false'),
     ({"prompt": "q", "completion": "a", "label": True, "chosen": "b"},
      '"chosen" beside "completion" / "label"'),
     ({"prompt": "q", "completion": "a </s>", "label": True},
      '"completion" contains the reserved token </s>'),
     ({"completion": "a", "label": True}, 'expected a string "prompt" or a list "messages"'),
     ({"prompt": "q", "chosen": "a", "rejected": "a"}, '"chosen" and "rejected" are the same')],
)  # fmt: skip
def test_bad_records_name_file_and_line(tmp_path, bad, expected):
    path = write(tmp_path / "bad.jsonl", [UNPAIRED[0], RECORDS[1], bad])
    with pytest.raises(DataError) as e:
        FeedbackRecords([path])
    assert f"{path}:3:" in str(e.value) and expected in str(e.value)


def test_rows_hold_prompt_and_answer_with_the_answer_masked(tmp_path, pref_template):
    """Each example's row against the template's text encoded in one piece; the label,
    weight and index ride along; the last batch is padded with weight-0 rows, index -1."""
    L = 40
    path = write(tmp_path / "mixed.jsonl", [UNPAIRED[0], RECORDS[1], UNPAIRED[2]])
    recs, fit = open_examples([path], pref_template, L)
    assert fit == {"examples": 4, "desirable": 3, "cut": 0, "without_answer": 0}
    batches = list(make_feedback_eval_dataset(recs, pref_template, loader(L, batch_size=3)))
    assert len(batches) == 2 and batches[0]["tokens"].shape == (3, L)
    rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(3)]
    for i in range(4):
        ex, row = recs[i], rows[i]
        tokens, targets, mask, _ = expected_row(pref_template, ex.prompt, ex.completion, L)
        n = len(tokens)
        np.testing.assert_array_equal(row["tokens"][:n], tokens)
        np.testing.assert_array_equal(row["targets"][:n], targets)
        np.testing.assert_array_equal(row["loss_mask"], np.pad(mask, (0, L - n)))
        np.testing.assert_array_equal(row["positions"][:n], np.arange(n))
        assert (row["label"], row["weight"], row["example"]) == (int(ex.label), 1.0, i)
    assert [r["example"] for r in rows[4:]] == [-1, -1] and not rows[5]["weight"]
    assert not rows[5]["segment_ids"].any()
    padded = make_feedback_eval_dataset(recs, pref_template, loader(L, batch_size=3), num_batches=4)
    extra = list(padded)[2:]
    assert len(extra) == 2 and not any(b["weight"].any() for b in extra)


def test_examples_cut_before_their_answer_are_left_out(tmp_path, pref_template):
    path = write(tmp_path / "long.jsonl", [UNPAIRED[0], {"prompt": LONG, "completion": "Sure.",
                                                          "label": True}])  # fmt: skip
    recs, fit = open_examples([path], pref_template, 24)
    assert fit["without_answer"] == 1 and fit["cut"] >= 1 and len(recs) == 1
    assert recs[0].completion == UNPAIRED[0]["completion"] and recs.total == 2
    with pytest.raises(DataError, match="cuts every example"):
        open_examples([write(tmp_path / "l.jsonl", [UNPAIRED[0]])], pref_template, 4)


def test_processes_split_and_shuffle_the_examples(tmp_path, pref_template):
    path = write(tmp_path / "mixed.jsonl", [*UNPAIRED, *RECORDS])
    recs, _ = open_examples([path], pref_template, 64)
    seen = []
    for p in range(2):
        ds = iter(make_feedback_dataset(recs, pref_template, loader(batch_size=4), seed=0,
                                        process_index=p, process_count=2))  # fmt: skip
        first = [next(ds)["example"] for _ in range(7)]  # 2 rows a batch: one epoch and more
        share = set(np.concatenate(first).tolist())
        assert share == set(range(p, len(recs), 2))  # every example of its share, no other
        seen.append(share)
    assert not seen[0] & seen[1]
