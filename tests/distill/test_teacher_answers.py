"""Black-box distillation's answers on a fake teacher's output (no model): which answers
become SFT records, what the summary counts, and that every record written loads in the
student's SFT stage (no reserved token, no unfinished answer, no human history turns)."""

import json

import pytest

from jaxllm.config import DistillConfig
from jaxllm.data.sft import SFTRecords, example_features
from jaxllm.errors import DataError
from jaxllm.generation.sampler import SampleResult
from jaxllm.tokenizer.chat import ChatTemplate
from jaxllm.trainers.distill import _Answerer

STRUCTURAL = ("<s>", "</s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")


class FakeTeacher(_Answerer):
    """An answerer whose 'sampler' returns the given (ids, stopped) rows."""

    def __init__(self, template, rows, **d) -> None:
        super().__init__(None, None, template, DistillConfig(mode="black_box", **d), 0, None)
        self.rows = rows

    def _generate(self, prompts):
        assert len(prompts) == len(self.rows)
        toks = [list(t) for t, _ in self.rows]
        return SampleResult(toks, [[0.0] * len(t) for t in toks], [len(t) for t in toks],
                            [s for _, s in self.rows])  # fmt: skip


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def fake_rows(tok):
    sp = tok.special_ids
    enc = tok.encode
    return [
        (enc("Four") + [sp["<|end|>"]], True),  # a proper answer
        (enc("Paris") + [sp["<|assistant|>"]], True),  # ended by a role token: cut there
        ([sp["<|user|>"]], True),  # nothing before the role token: empty
        (enc("It is a long"), False),  # hit max_new_tokens unfinished
        (enc("Red<|user|>blue", specials=False) + [sp["<|end|>"]], True),  # spelt in pieces
        (enc("Hi") + [sp["</s>"]], True),
    ]


def test_answers_stop_at_structure_and_unfinished_ones_are_dropped(tmp_path, tok):
    template = ChatTemplate(tok)
    prompts = write(tmp_path / "p.jsonl", [{"prompt": f"Q{i}?", "response": "A"} for i in range(6)])
    teacher = FakeTeacher(template, fake_rows(tok))
    assert sorted(teacher.stops) == sorted(tok.special_ids[s] for s in STRUCTURAL)
    rows, figures = teacher(prompts, "prompts_file", 0)
    assert [r["response"] for r in rows] == ["Four", "Paris", "Red", "Hi"]
    assert [r["prompt"] for r in rows] == ["Q0?", "Q1?", "Q4?", "Q5?"]
    assert figures["answers"] == 4 and figures["empty_answers"] == 1
    assert figures["dropped_truncated"] == 1 and figures["cut_at_reserved"] == 2
    assert figures["stopped_share"] == round(5 / 6, 4)
    # the student's SFT stage reads every record and learns exactly the teacher's answers
    out = write(tmp_path / "answers.jsonl", rows)
    records = SFTRecords([out])
    for i, want in enumerate(["Four", "Paris", "Red", "Hi"]):
        f = example_features(records[i], template, train_on_prompt=False)
        learnt = [int(t) for t, m in zip(f["targets"], f["loss_mask"]) if m]
        assert learnt == tok.encode(want) + [tok.special_ids["<|end|>"], tok.special_ids["</s>"]]
    # keep_truncated: the unfinished answer is kept as it is
    rows, figures = FakeTeacher(template, fake_rows(tok), keep_truncated=True)(
        prompts, "prompts_file", 0
    )
    assert [r["response"] for r in rows] == ["Four", "Paris", "It is a long", "Red", "Hi"]
    assert figures["dropped_truncated"] == 0 and figures["answers"] == 5


def test_prompts_with_earlier_assistant_turns_are_refused(tmp_path, tok):
    """The SFT loader learns every assistant turn: a human answer in the history would be
    taught as the teacher's, so black-box distillation refuses such prompts by file:line."""
    turns = [
        {"role": "user", "content": "How can I pay?"},
        {"role": "assistant", "content": "HUMAN ANSWER"},
        {"role": "user", "content": "Which cards?"},
    ]
    recs = [{"prompt": "Hi?", "response": "A"}, {"messages": turns}]
    prompts = write(tmp_path / "prompts.jsonl", recs)
    teacher = FakeTeacher(ChatTemplate(tok), [])
    with pytest.raises(DataError, match=r"prompts\.jsonl:2: distill\.prompts_file: .*assistant"):
        teacher(prompts, "prompts_file", 0)
