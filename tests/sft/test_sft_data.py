"""SFT batches: pretraining's keys, the loss mask on answers only, packing keeps the mask."""

import json
from collections import Counter

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import LoaderConfig
from jaxllm.data.sft import SFTRecords, example_features, make_sft_dataset, make_sft_eval_dataset
from jaxllm.errors import DataError
from jaxllm.training.losses import cross_entropy
from tests.test_jsonl import HOSTILE, assert_one_line_at, write_with_hostile

CONVS = [
    [{"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": str(a + b)}]
    for a, b in [(1, 2), (17, 25), (30, 4), (9, 9), (12, 40)]
] + [
    [
        {"role": "system", "content": "Answer in Chinese."},
        {"role": "user", "content": "除夕夜应该吃什么呢？"},
        {"role": "assistant", "content": "饺子"},
        {"role": "user", "content": "端午节呢？"},
        {"role": "assistant", "content": "粽子"},
    ],
    [{"role": "user", "content": "Continue this verse: In the beginning God created the heaven."},
     {"role": "assistant", "content": "And the earth was without form, and void."}],
]  # fmt: skip
KEYS = {"tokens", "targets", "segment_ids", "positions", "loss_mask"}


@pytest.fixture
def chat_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in CONVS))
    return path


def one_pass(path, template, packing, seq_len=32, batch_size=4):
    cfg = LoaderConfig(seq_len=seq_len, batch_size=batch_size, prefetch=0, num_threads=1)
    return list(make_sft_eval_dataset([path], template, cfg, packing=packing))


def triples(batches) -> Counter:
    """(token, target, mask) of every real position: the layout-free content of the data."""
    out = Counter()
    for b in batches:
        real = b["segment_ids"] > 0
        out.update(zip(b["tokens"][real], b["targets"][real], b["loss_mask"][real]))
    return out


def bigram_loss(batches, vocab: int):
    """Masked CE under fixed random logits that depend on the input token only (a bigram
    table), so any layout of the same (token, target, mask) triples gives the same sums."""
    table = np.random.default_rng(0).normal(size=(vocab, vocab)).astype(np.float32)
    loss = weight = 0.0
    for b in batches:
        total, aux = cross_entropy(jnp.asarray(table[b["tokens"]]), b["targets"], b["loss_mask"])
        loss, weight = loss + float(total), weight + float(aux["weight"])
    return loss, weight


def test_cross_entropy_matches_numpy_with_a_mask():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32)
    targets = rng.integers(0, 11, size=(2, 5))
    mask = (rng.random((2, 5)) > 0.4).astype(np.float32)
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    nll = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    total, aux = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    np.testing.assert_allclose(float(total), (nll * mask).sum(), rtol=1e-5)
    assert float(aux["weight"]) == mask.sum()


def test_features_shift_the_role_mask_to_targets(template):
    f = example_features(CONVS[0], template, train_on_prompt=False)
    answer = template.tok.decode(f["targets"][f["loss_mask"] == 1])
    assert answer == "3<|end|></s>"
    assert len(f["tokens"]) == len(f["targets"]) == len(f["loss_mask"])


@pytest.mark.parametrize("packing", [True, False])
def test_batches_have_pretraining_keys_and_mask_only_answers(chat_file, template, packing):
    batches = one_pass(chat_file, template, packing, seq_len=64)
    for b in batches:
        assert set(b) == KEYS and all(v.shape == (4, 64) for v in b.values())
        assert (
            b["loss_mask"].dtype == np.float32
            and not (b["loss_mask"] * (b["segment_ids"] == 0)).any()
        )
    learned = [
        template.tok.decode(b["targets"][r][b["loss_mask"][r] == 1])
        for b in batches
        for r in range(4)
    ]
    text = "".join(learned)
    for conv in CONVS:
        for m in conv:
            want = m["content"] + "<|end|>"
            assert (want in text) == (m["role"] == "assistant"), m
    assert text.count("</s>") == len(CONVS)


def test_packed_and_unpacked_give_the_same_masked_loss(chat_file, template):
    packed = one_pass(chat_file, template, packing=True, seq_len=64)
    padded = one_pass(chat_file, template, packing=False, seq_len=64)  # no conversation cut
    assert max(int(b["segment_ids"].max()) for b in packed) >= 2  # rows hold several
    rows = sum(int((b["segment_ids"][:, 0] > 0).sum()) for b in packed)
    pieces = sum(len(np.unique(r[r > 0])) for b in packed for r in b["segment_ids"])
    assert pieces == len(CONVS) and rows < pieces  # whole conversations, sharing rows
    assert triples(packed) == triples(padded)
    vocab = template.tok.vocab_size
    (lp, wp), (lu, wu) = bigram_loss(packed, vocab), bigram_loss(padded, vocab)
    assert wp == wu > 0
    np.testing.assert_allclose(lp, lu, rtol=1e-5)


def test_unpacked_rows_cut_long_conversations(chat_file, template):
    (b, *_) = one_pass(chat_file, template, packing=False, seq_len=8)
    assert (b["segment_ids"] == 1).all() and (b["positions"][0] == np.arange(8)).all()


def test_train_stream_resumes_from_json_state(chat_file, template):
    cfg = LoaderConfig(seq_len=16, batch_size=2, prefetch=0, num_threads=1)
    it = iter(make_sft_dataset([chat_file], template, cfg, seed=3))
    next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(3)]
    it2 = iter(make_sft_dataset([chat_file], template, cfg, seed=3))
    it2.set_state(state)
    for a, b in zip(want, [next(it2) for _ in range(3)]):
        assert all((a[k] == b[k]).all() for k in KEYS)


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_line_names_file_and_line(tmp_path, template, case):
    """Deep nesting, lone surrogates, huge numbers: a DataError at file:2, by index and in the
    grain pipeline (never a RecursionError or a silently changed text)."""
    path = write_with_hostile(tmp_path / "bad.jsonl", {"prompt": "p", "response": "r"}, case)
    records = SFTRecords([path])
    assert len(records) == 3 and records[2][1]["content"] == "r"
    with pytest.raises(DataError) as e:
        records[1]
    assert_one_line_at(e.value, f"{path}:2")
    with pytest.raises(DataError) as e:
        one_pass(path, template, packing=True)
    assert_one_line_at(e.value, f"{path}:2")


def test_bad_record_names_file_and_line(tmp_path, template):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "p", "response": "r"})
    path.write_text(f"{good}\n\n{good}\n{json.dumps({'prompt': 'p'})}\n")
    records = SFTRecords([path])
    assert len(records) == 3 and records[1][1]["content"] == "r"
    with pytest.raises(DataError, match=rf"{path}:4: .*\"response\""):
        records[2]
    with pytest.raises(DataError, match=rf"{path}:4:"):
        one_pass(path, template, packing=True)


def test_task_filter_keeps_only_those_records_and_names_lines_in_the_file(tmp_path, template):
    path = tmp_path / "mixed.jsonl"
    recs = [{"prompt": f"q{i}", "response": f"a{i}", "task": t}
            for i, t in enumerate(["math", "service", "poem", "service", "math"])]  # fmt: skip
    recs.append({"prompt": "q5", "task": "service"})  # bad: no response, at line 6
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    records = SFTRecords([path], tasks=("service",))
    assert len(records) == 3
    assert [records.record(i)["prompt"] for i in range(3)] == ["q1", "q3", "q5"]
    assert records[1][1]["content"] == "a3"
    with pytest.raises(DataError, match=rf"{path}:6:"):  # the line in the file, not the index
        records[2]
    both = SFTRecords([path], tasks=("math", "poem"))
    assert [both.record(i)["prompt"] for i in range(len(both))] == ["q0", "q2", "q4"]
    with pytest.raises(DataError, match=r"sft\.tasks"):
        SFTRecords([path], tasks=("nothing",))
    cfg = LoaderConfig(seq_len=32, batch_size=2, prefetch=0, num_threads=1)
    rows = list(make_sft_eval_dataset([path], template, cfg, packing=False, tasks=("math",)))
    seen = {template.tok.decode(b["tokens"][r][b["segment_ids"][r] > 0]) for b in rows
            for r in range(2)}  # fmt: skip
    assert any("q0" in x for x in seen) and any("q4" in x for x in seen)
    assert not any("q1" in x or "q3" in x or "q2" in x for x in seen)


def test_length_census_counts_cut_rows_and_rows_without_an_answer(tmp_path, template):
    from jaxllm.config import from_dict
    from jaxllm.data.sft import length_census
    from jaxllm.errors import ConfigError
    from jaxllm.trainers.sft import _fit_report

    tok, L = template.tok, 24
    recs = [
        {"prompt": "hi", "response": "ok"},  # fits
        {"prompt": "hi", "response": "a long answer " * 10},  # cut inside the answer
        {"prompt": "a long question " * 10, "response": "ok"},
    ]  # cut before the answer
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    # by hand: <s><|user|>prompt<|end|><|assistant|> is the part with no trained token
    head = [3 + len(tok.encode(r["prompt"])) + 1 for r in recs]
    n = [h + len(tok.encode(r["response"])) + 2 for h, r in zip(head, recs)]  # + <|end|></s>
    assert n[0] - 1 <= L < n[1] - 1 and head[1] < L + 1 and head[2] > L + 1  # the cases meant
    got = length_census(SFTRecords([path]), template, L, train_on_prompt=False)
    assert got == {"conversations": 3, "longer": 2, "without_answer": 1}
    assert (
        length_census(SFTRecords([path]), template, L, train_on_prompt=True)["without_answer"] == 0
    )
    raw = {
        "stage": "sft",
        "loader": {"seq_len": 4},
        "sft": {"train_file": str(path), "packing": False},
    }
    with pytest.raises(ConfigError, match=r"'loader.seq_len': 4 cuts every conversation"):
        _fit_report(from_dict(raw), from_dict(raw).sft, template)
    packed = from_dict({**raw, "loader": {"seq_len": L}, "sft": {"train_file": str(path)}})
    assert _fit_report(packed, packed.sft, template) == got  # packed rows cut the same ones


def test_an_empty_train_or_val_file_is_reported_as_empty(tmp_path, template):
    """Not as "loader.seq_len cuts every conversation" (train) or "no held-out prompt fits"
    (val): the file holds no record, and the message names its config key."""
    from jaxllm.config import from_dict
    from jaxllm.trainers.sft import _fit_report, _scorer

    empty, good = tmp_path / "empty.jsonl", tmp_path / "good.jsonl"
    empty.write_text("\n" + " " * 20 + "\n")
    good.write_text(json.dumps({"prompt": "hi", "response": "ok"}) + "\n")
    expected = '{"prompt", "response", "system"?} or {"messages": [...]}'
    cfg = from_dict({"stage": "sft", "sft": {"train_file": str(empty)}})
    with pytest.raises(DataError) as e:
        _fit_report(cfg, cfg.sft, template)
    assert str(e.value) == (
        f"config key 'sft.train_file': {empty} holds no records; expected JSONL lines of {expected}"
    )
    cfg = from_dict({"stage": "sft", "sft": {"train_file": str(good), "val_file": str(empty)}})
    with pytest.raises(DataError, match=rf"^config key 'sft.val_file': {empty} holds no records"):
        _scorer(cfg, cfg.sft, *[None] * 6, {})  # refused before any model is needed
    with pytest.raises(DataError, match=rf"^{empty}: no records; expected JSONL lines of"):
        SFTRecords([empty])


def test_fewer_records_than_processes_says_each_needs_one(tmp_path, template):
    good = tmp_path / "one.jsonl"
    good.write_text(json.dumps({"prompt": "hi", "response": "ok"}) + "\n")
    cfg = LoaderConfig(seq_len=32, batch_size=4)
    with pytest.raises(DataError) as e:
        make_sft_dataset([good], template, cfg, seed=0, process_index=1, process_count=2)
    assert str(e.value) == (
        f"1 SFT records in {good} for 2 processes: each process needs at least one"
    )
