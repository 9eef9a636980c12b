"""Packed SFT rows hold whole conversations (never a tail cut from its prompt), cut only one
longer than a row; the stream resumes exactly and splits over processes; every record is
checked at start-up, packed or not."""

import json
from collections import Counter

import pytest

from jaxllm.config import LoaderConfig, from_dict
from jaxllm.data.sft import SFTRecords, length_census, make_sft_dataset, make_sft_eval_dataset
from jaxllm.errors import DataError
from jaxllm.tokenizer.chat import render_text
from jaxllm.trainers.sft import _fit_report

KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


def conversations(n: int = 30) -> list[list[dict]]:
    """Short and long arithmetic chats (7 to ~60 tokens) and one past any row below."""
    out = []
    for i in range(n):
        q = f"What is {i} + {2 * i}?" + " Please show the sum." * (i % 4)
        out.append([{"role": "user", "content": q}, {"role": "assistant", "content": str(3 * i)}])
    out.append(
        [{"role": "user", "content": "Say it. " * 40}, {"role": "assistant", "content": "it"}]
    )
    return out


@pytest.fixture
def conv_file(tmp_path):
    path = tmp_path / "convs.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations()))
    return path


def segments(batches):
    """Every (row) segment as its (tokens, targets, positions) lists."""
    out = []
    for b in batches:
        for r in range(len(b["tokens"])):
            seg = b["segment_ids"][r]
            for s in sorted(set(seg.tolist()) - {0}):
                at = seg == s
                out.append(tuple(b[k][r][at].tolist() for k in ("tokens", "targets", "positions")))
    return out


def expected(template, convs, L):
    """By hand: a conversation's ids (`encode` of its text), shifted, cut to its first L."""
    out = []
    for m in convs:
        ids = template.tok.encode(render_text(m))
        out.append((ids[:-1][:L], ids[1:][:L], list(range(min(len(ids) - 1, L)))))
    return out


def test_packed_rows_hold_whole_conversations_and_cut_only_longer_ones(conv_file, template):
    L = 64
    cfg = LoaderConfig(seq_len=L, batch_size=4, prefetch=0, num_threads=1)
    batches = list(make_sft_eval_dataset([conv_file], template, cfg, packing=True))
    got, want = segments(batches), expected(template, conversations(), L)
    longer = sum(len(template.tok.encode(render_text(m))) - 1 > L for m in conversations())
    assert longer == 1 and max(len(w[0]) for w in want[:-1]) > L // 2  # the cases meant
    assert Counter(map(str, got)) == Counter(map(str, want))  # each once, whole, from <s>
    assert all(g[0][0] == template.ids["<s>"] for g in got)
    rows = sum(int((b["segment_ids"][:, 0] > 0).sum()) for b in batches)
    assert rows < len(want)  # rows are shared...
    real = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    assert real / (rows * L) > 0.8  # ...and mostly full
    census = length_census(SFTRecords([conv_file]), template, L, train_on_prompt=False)
    assert census == {"conversations": len(want), "longer": longer, "without_answer": 1}


def test_packed_stream_resumes_exactly_mid_run(conv_file, template):
    cfg = LoaderConfig(seq_len=64, batch_size=2, prefetch=2, num_threads=2)
    it = iter(make_sft_dataset([conv_file], template, cfg, seed=5))
    for _ in range(11):  # past the first epoch, with rows of the packer still open
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(6)]
    again = iter(make_sft_dataset([conv_file], template, cfg, seed=5))
    again.set_state(state)
    for a, b in zip(want, [next(again) for _ in range(6)]):
        assert all((a[k] == b[k]).all() for k in KEYS)


def test_two_processes_pack_their_own_halves_whole(conv_file, template):
    L = 64
    cfg = LoaderConfig(seq_len=L, batch_size=4, prefetch=0, num_threads=1)
    halves = [
        segments(make_sft_eval_dataset([conv_file], template, cfg, process_index=p,
                                       process_count=2))
        for p in (0, 1)
    ]  # fmt: skip
    want = expected(template, conversations(), L)
    assert Counter(map(str, halves[0])) == Counter(map(str, want[0::2]))
    assert Counter(map(str, halves[1])) == Counter(map(str, want[1::2]))


@pytest.mark.parametrize("packing", [True, False])
def test_a_bad_record_stops_the_run_at_start_up_packed_or_not(tmp_path, template, packing):
    lines = [json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) for i in range(300)]
    lines[250] = json.dumps({"prompt": "q", "response": "   "})  # line 251: nothing to learn
    path = tmp_path / "late.jsonl"
    path.write_text("\n".join(lines) + "\n")
    raw = {"stage": "sft", "loader": {"seq_len": 32}, "sft": {"train_file": str(path),
                                                            "packing": packing}}  # fmt: skip
    cfg = from_dict(raw)
    with pytest.raises(DataError, match=rf"^{path}:251: .*no text to learn"):
        _fit_report(cfg, cfg.sft, template)
