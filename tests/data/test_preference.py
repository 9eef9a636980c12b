"""Preference records → weighted pairs → [B, 2, L] batches; prompts for RL stages."""

import json

import numpy as np
import pytest

from jaxllm.config import LoaderConfig
from jaxllm.data.preference import (
    PreferenceRecords,
    PromptRecords,
    fit_pairs,
    make_preference_dataset,
    make_preference_eval_dataset,
    prompt_rows,
    ranking_pairs,
)
from jaxllm.errors import DataError
from jaxllm.tokenizer.chat import render_text
from tests.test_jsonl import HOSTILE, assert_one_line_at, write_with_hostile

RECORDS = [
    {"prompt": "Where is my order?", "responses": ["Not my problem.", "Happy to help! Check My Orders.",
     "I'm not sure."], "ranking": [1, 2, 0], "task": "service"},
    {"prompt": "What is 17 + 25?", "chosen": "42", "rejected": "43", "task": "math"},
    {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"},
                  {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And?"}],
     "responses": ["a", "b", "c", "d"], "ranking": [3, 0, 2, 1]},  # an earlier answer: not learnt
    {"prompt": "What is 3 + 4?", "chosen": "7", "rejected": "8", "task": "math"},
]  # fmt: skip
KEYS = {"tokens", "targets", "loss_mask", "segment_ids", "positions", "weight", "pair"}


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def pref_file(tmp_path):
    return write(tmp_path / "pref.jsonl", RECORDS)


def loader(seq_len=64, batch_size=4, shuffle=True):
    return LoaderConfig(seq_len=seq_len, batch_size=batch_size, shuffle=shuffle, num_threads=1, prefetch=0)  # fmt: skip


def test_ranking_pairs_are_all_better_worse_pairs():
    assert ranking_pairs([2, 0, 1]) == [(2, 0), (2, 1), (0, 1)]
    assert len(ranking_pairs([3, 1, 0, 2])) == 6
    assert ranking_pairs([1, 0]) == [(1, 0)]


def test_records_expand_to_weighted_pairs(pref_file):
    recs = PreferenceRecords([pref_file])
    pairs = [recs[i] for i in range(len(recs))]
    assert len(pairs) == 3 + 1 + 6 + 1
    first = pairs[:3]  # K=3: 3 pairs of weight 1/3, best over mid over worst
    assert [(p.chosen, p.rejected) for p in first] == [
        ("Happy to help! Check My Orders.", "I'm not sure."),
        ("Happy to help! Check My Orders.", "Not my problem."),
        ("I'm not sure.", "Not my problem."),
    ]
    assert all(p.weight == pytest.approx(1 / 3) and p.task == "service" for p in first)
    assert pairs[3] == (
        [{"role": "user", "content": "What is 17 + 25?"}],
        "42",
        "43",
        1.0,
        "math",
        3,
    )
    assert [p.index for p in pairs] == list(range(len(pairs)))
    four = pairs[4:10]  # K=4: 6 pairs of weight 1/6
    assert all(p.weight == pytest.approx(1 / 6) and p.task == "" for p in four)
    assert {(p.chosen, p.rejected) for p in four} == {
        ("d", "a"),
        ("d", "c"),
        ("d", "b"),
        ("a", "c"),
        ("a", "b"),
        ("c", "b"),
    }
    assert four[0].prompt[0] == {"role": "system", "content": "Be kind."}
    assert recs.weights.sum() == pytest.approx(4.0)  # each prompt counts once


@pytest.mark.parametrize(
    "bad, expected",
    [
        ({"prompt": "q", "chosen": "a"}, 'expected a string "rejected"'),
        ({"chosen": "a", "rejected": "b"}, 'expected a string "prompt"'),
        ({"prompt": "q", "chosen": "a", "rejected": "a"}, "are the same text"),
        ({"prompt": "q", "chosen": 1, "rejected": "b"}, 'expected a string "chosen"'),
        ({"prompt": "q", "responses": ["a", "b"], "ranking": [0, 0]}, "must list the indices 0..1"),
        ({"prompt": "q", "responses": ["a", "b"], "ranking": [0, 1, 2]}, "must list the indices"),
        ({"prompt": "q", "responses": ["a"], "ranking": [0]}, "at least 2"),
        ({"prompt": "q", "responses": ["a", 2], "ranking": [0, 1]}, "a list of strings"),
        ({"prompt": "q", "responses": ["a", "b"]}, "must list the indices"),
        ({"prompt": "q", "response": "a"}, "expected {"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
          "chosen": "a", "rejected": "b"}, "must end with a user turn"),
        ({"prompt": "q", "chosen": "a <|end|> b", "rejected": "c"},
         '"chosen" contains the reserved token <|end|>'),
        ({"prompt": "q", "chosen": "a", "rejected": "<|user|> hi"},
         '"rejected" contains the reserved token <|user|>'),
        ({"prompt": "q", "responses": ["a", "b </s>"], "ranking": [1, 0]},
         '"responses"[1] contains the reserved token </s>'),
        ({"prompt": "q", "system": 5, "chosen": "a", "rejected": "b"},
         '"system" must be a string, got int'),
        ({"prompt": "q", "system": None, "chosen": "a", "rejected": "b"},
         '"system" must be a string, got NoneType'),
    ],
)  # fmt: skip
def test_bad_records_name_file_and_line(tmp_path, bad, expected):
    path = write(tmp_path / "bad.jsonl", [RECORDS[1], RECORDS[3], bad])
    with pytest.raises(DataError) as e:
        PreferenceRecords([path])
    assert f"{path}:3:" in str(e.value)
    assert expected in str(e.value)


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_line_names_file_and_line(tmp_path, case):
    """Deep nesting, lone surrogates, huge numbers: a DataError at file:2 from the preference
    reader and from the prompt reader of RL and black-box distillation."""
    path = write_with_hostile(tmp_path / "bad.jsonl", RECORDS[1], case)
    with pytest.raises(DataError) as e:
        PreferenceRecords([path])
    assert_one_line_at(e.value, f"{path}:2")
    prompts = PromptRecords([path])
    assert prompts[2]["answer"] is None and len(prompts) == 3
    with pytest.raises(DataError) as e:
        prompts[1]
    assert_one_line_at(e.value, f"{path}:2")


def expected_row(template, prompt, answer, L):
    """Tokens and mask from the template's text, encoded in one piece (not `render`)."""
    tok = template.tok
    ids = tok.encode(render_text([*prompt, {"role": "assistant", "content": answer}]))
    n_prompt = len(tok.encode(render_text(prompt, add_generation_prompt=True)))
    mask = [1.0 if j + 1 >= n_prompt else 0.0 for j in range(len(ids) - 1)][:L]
    return ids[:-1][:L], ids[1:][:L], mask, n_prompt


def test_batches_hold_chosen_and_rejected_with_answer_masks(pref_file, pref_template):
    L = 48
    batches = list(make_preference_eval_dataset([pref_file], pref_template, loader(L)))
    recs = PreferenceRecords([pref_file])
    assert len(batches) == 3  # 11 pairs in batches of 4, the last padded
    for b in batches:
        assert set(b) == KEYS
        assert all(b[k].shape == (4, 2, L) and b[k].dtype == np.int32 for k in KEYS - {"weight", "loss_mask", "pair"})  # fmt: skip
        assert b["loss_mask"].dtype == b["weight"].dtype == np.float32 and b["weight"].shape == (4,)
    rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(4)]
    assert [r["pair"] for r in rows[len(recs) :]] == [-1] * (12 - len(recs))  # padding rows
    for i in range(len(recs)):
        pair, row = recs[i], rows[i]
        assert row["weight"] == np.float32(pair.weight) and row["pair"] == i
        for side, answer in enumerate((pair.chosen, pair.rejected)):
            tokens, targets, mask, n_prompt = expected_row(pref_template, pair.prompt, answer, L)
            n = len(tokens)
            np.testing.assert_array_equal(row["tokens"][side][:n], tokens)
            np.testing.assert_array_equal(row["targets"][side][:n], targets)
            np.testing.assert_array_equal(row["loss_mask"][side], np.pad(mask, (0, L - n)))
            np.testing.assert_array_equal(row["segment_ids"][side], [1] * n + [0] * (L - n))
            np.testing.assert_array_equal(row["positions"][side][:n], np.arange(n))
            learnt = row["targets"][side][row["loss_mask"][side] == 1]
            assert pref_template.tok.decode(learnt) == f"{answer}<|end|></s>"
        # both sides share the prompt: the same tokens up to the answer
        np.testing.assert_array_equal(row["tokens"][0][:n_prompt], row["tokens"][1][:n_prompt])


def test_eval_padding_rows_have_weight_zero(pref_file, pref_template):
    last = list(make_preference_eval_dataset([pref_file], pref_template, loader()))[-1]
    np.testing.assert_array_equal(last["weight"][3:], 0.0)
    assert last["weight"][:3].min() > 0
    assert not last["segment_ids"][3:].any() and not last["loss_mask"][3:].any()
    padded = make_preference_eval_dataset([pref_file], pref_template, loader(), num_batches=5)
    extra = list(padded)[3:]
    assert len(extra) == 2 and all(not b["weight"].any() for b in extra)
    assert extra[0]["tokens"].shape == (4, 2, 64)


LONG = "Please tell me about my order and the refund and the shipping. " * 3
SHARED = "We accept all major cards, PayPal and bank transfer. " * 3
CUT_RECORDS = [
    {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go."},  # fits
    {"prompt": LONG, "chosen": "Happy to help!", "rejected": "No."},  # prompt fills L
    {"prompt": "Card?", "chosen": SHARED + "Thanks!", "rejected": SHARED + "Go away."},
    {"prompt": "Card?", "chosen": "Yes, " + SHARED, "rejected": "No, " + SHARED},  # cut, differ
    {"prompt": "Hours?", "responses": ["Nine to five.", SHARED + "a", SHARED + "b"],
     "ranking": [0, 1, 2]},  # pairs (0, 1), (0, 2) cut but differ; (1, 2) identical
]  # fmt: skip


def test_long_pairs_are_counted_and_identical_rows_left_out(tmp_path, pref_template):
    """`fit_pairs` against the template's text encoded in one piece: a side longer than
    L + 1 ids is cut; a pair whose first L + 1 ids agree gives two identical rows (dropped
    from the batches), without an answer token when the prompt alone fills L."""
    L, tok = 24, pref_template.tok
    path = write(tmp_path / "long.jsonl", CUT_RECORDS)
    recs = PreferenceRecords([path])
    want = {"pairs": len(recs), "cut": 0, "identical": 0, "without_answer": 0}
    kept = []
    for i in range(len(recs)):
        pair = recs[i]
        ids = [tok.encode(render_text([*pair.prompt, {"role": "assistant", "content": a}]))
               for a in (pair.chosen, pair.rejected)]  # fmt: skip
        n_prompt = len(tok.encode(render_text(pair.prompt, add_generation_prompt=True)))
        want["cut"] += max(map(len, ids)) - 1 > L
        same = ids[0][: L + 1] == ids[1][: L + 1]
        want["identical"] += same
        want["without_answer"] += n_prompt - 1 >= L
        kept += [] if same else [i]
    assert want == {"pairs": 7, "cut": 6, "identical": 3, "without_answer": 1}  # all cases hit
    keep, fit = fit_pairs(recs, pref_template, L)
    assert fit == want and list(np.nonzero(keep)[0]) == kept
    batches = list(make_preference_eval_dataset([path], pref_template, loader(L)))
    got = [int(p) for b in batches for p in b["pair"] if p >= 0]
    assert got == kept  # each kept pair once, with its index in the file's pairs
    for b in batches:
        for row in np.nonzero(b["weight"])[0]:  # the two sides of a kept pair differ
            assert any(not np.array_equal(*b[k][row]) for k in ("tokens", "targets"))
    train = make_preference_dataset([path], pref_template, loader(L, shuffle=False), seed=0)
    first = next(iter(train))
    assert [int(p) for p in first["pair"]] == kept[:4]
    # every pair cut to identical rows: refused, naming the key
    write(path, [CUT_RECORDS[1], CUT_RECORDS[2]])
    with pytest.raises(DataError, match=r"loader.seq_len 24 cuts every pair in .*long.jsonl"):
        make_preference_dataset([path], pref_template, loader(L), seed=0)


def test_training_iterator_state_round_trips_through_json(pref_file, pref_template):
    ds = make_preference_dataset([pref_file], pref_template, loader(batch_size=2), seed=3)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(5)]  # crosses an epoch boundary (11 pairs)
    resumed = iter(ds)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for k in KEYS:
            np.testing.assert_array_equal(got[k], want[k])


def test_processes_split_the_pairs(pref_file, pref_template):
    seen = []
    for p in range(2):
        ds = make_preference_eval_dataset(
            [pref_file], pref_template, loader(batch_size=4), process_index=p, process_count=2
        )
        for b in ds:
            real = b["weight"] > 0
            seen += [tuple(t) for t in b["targets"][real, 0]]
            assert b["tokens"].shape[0] == 2  # local rows
    assert len(seen) == 11


def test_prompt_rows_for_rl(tmp_path, pref_template):
    records = [
        {"prompt": "Tom has 3 apples and buys 5 more.", "response": "<think>3 + 5 = 8</think>8",
         "answer": "8", "task": "reasoning"},
        RECORDS[0],
        RECORDS[1],
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello"}]},
    ]  # fmt: skip
    rows = prompt_rows(PromptRecords([write(tmp_path / "p.jsonl", records)]), pref_template)
    assistant = pref_template.tok.special_ids["<|assistant|>"]
    assert all(r["ids"][-1] == assistant for r in rows)
    user = [{"role": "user", "content": records[0]["prompt"]}]
    assert rows[0]["ids"] == pref_template.tok.encode(render_text(user, add_generation_prompt=True))
    assert (rows[0]["answer"], rows[0]["task"], "chosen" in rows[0]) == ("8", "reasoning", False)
    assert rows[0]["prompt"] == records[0]["prompt"] and rows[3]["prompt"] == "Hi?"
    assert rows[1]["chosen"] == "Happy to help! Check My Orders." and rows[1]["answer"] is None
    assert rows[2]["chosen"] == "42"
    hi = [{"role": "user", "content": "Hi?"}]
    assert rows[3]["ids"] == pref_template.render(hi, add_generation_prompt=True).ids
    with pytest.raises(DataError, match=r"p2.jsonl:2: \"answer\" must be a string"):
        PromptRecords([write(tmp_path / "p2.jsonl", [records[0], {"prompt": "q", "answer": 8}])])[1]


@pytest.mark.parametrize("system, kind", [(5, "int"), (None, "NoneType"), (["x"], "list")])
def test_prompt_records_refuse_a_non_string_system_as_sft_does(tmp_path, system, kind):
    """RL / distill prompt files: the same one-line error at file:line as the SFT reader's."""
    from jaxllm.data.sft import SFTRecords

    bad = {"prompt": "q", "system": system, "response": "a"}
    path = write(tmp_path / "p.jsonl", [{"prompt": "fine", "system": "Be kind."}, bad])
    prompts = PromptRecords([path])
    assert prompts[0]["messages"][0] == {"role": "system", "content": "Be kind."}
    want = f'{path}:2: "system" must be a string, got {kind}; fix or remove the line'
    for read in (lambda: prompts[1], lambda: SFTRecords([path])[1]):
        with pytest.raises(DataError) as e:
            read()
        assert str(e.value) == want


@pytest.mark.parametrize("text", ["", "\n\n", " " * 40 + "\n"])
def test_files_without_records_are_refused_naming_the_key(tmp_path, text):
    """An empty (or blank-lines-only) file: "no records", not a count or a length problem."""
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    with pytest.raises(DataError) as e:
        PreferenceRecords([path], key="dpo.val_file")
    assert str(e.value) == (
        f"config key 'dpo.val_file': {path} holds no records; expected JSONL lines of "
        '{"prompt", "chosen", "rejected"} or {"prompt", "responses", "ranking"}'
    )
    with pytest.raises(DataError, match=rf"^{path}: no records; expected JSONL lines of "):
        PreferenceRecords([path])  # no key: the reward / DPO fit report's call
    with pytest.raises(DataError, match=rf"^config key 'grpo.prompt_file': {path} holds no rec"):
        PromptRecords([path], key="grpo.prompt_file")


def test_stage_fit_report_names_the_file_key(tmp_path, template):
    """reward / dpo read their files through `fit_report`: an empty one names its key."""
    from jaxllm.trainers.pairs import fit_report

    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match=rf"^config key 'reward.val_file': {path} holds no records"):
        fit_report("reward", path, template, 64, "reward.val_file")
