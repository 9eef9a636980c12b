"""The chat template: exact ids, role masks, prompts for generation, record errors."""

import pytest

from jaxllm.errors import DataError
from jaxllm.tokenizer.chat import ChatTemplate, parse_record, render_text, split_answer

SINGLE = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "除夕夜吃什么？"},
    {"role": "assistant", "content": "饺子"},
    {"role": "user", "content": "And on 端午?"},
    {"role": "assistant", "content": "粽子 (zongzi)"},
]


def masked_text(template: ChatTemplate, messages, **kw) -> str:
    r = template.render(messages, **kw)
    return template.tok.decode([i for i, m in zip(r.ids, r.mask) if m])


def test_format_and_ids_match_encoding_the_text(template):
    assert render_text(SINGLE) == "<s><|user|>What is 2 + 3?<|end|><|assistant|>5<|end|></s>"
    for messages in (SINGLE, MULTI):
        r = template.render(messages)
        assert r.ids == template.tok.encode(render_text(messages))
        assert len(r.mask) == len(r.ids) and set(r.mask) <= {0, 1}
        assert template.tok.decode(r.ids) == render_text(messages)


def test_mask_is_on_answers_their_end_and_the_final_eos(template):
    assert masked_text(template, SINGLE) == "5<|end|></s>"
    assert masked_text(template, MULTI) == "饺子<|end|>粽子 (zongzi)<|end|></s>"


def test_train_on_prompt_masks_everything_but_bos(template):
    r = template.render(MULTI, train_on_prompt=True)
    assert r.mask == [0] + [1] * (len(r.ids) - 1)


def test_prompt_ids_end_with_the_assistant_token_and_prefix_the_conversation(template):
    for messages in (SINGLE, MULTI):
        full = template.render(messages).ids
        prompt = template.prompt_ids(messages)
        assert prompt[-1] == template.ids["<|assistant|>"]
        assert full[: len(prompt)] == prompt
        assert template.tok.decode(full[len(prompt) :]) == messages[-1]["content"] + "<|end|></s>"
    history, answer = split_answer(MULTI)
    assert answer == "粽子 (zongzi)" and history == MULTI[:-1]
    assert template.prompt_ids(history) == template.prompt_ids(MULTI)
    assert render_text(history, add_generation_prompt=True).endswith("<|end|><|assistant|>")


def test_records_in_both_formats():
    pr = parse_record({"prompt": "p", "response": "r", "task": "x"}, "f:1")
    assert pr == [{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}]
    sys = parse_record({"system": "s", "prompt": "p", "response": "r"}, "f:1")
    assert sys[0] == {"role": "system", "content": "s"} and len(sys) == 3
    assert parse_record({"messages": MULTI}, "f:1") == MULTI
    assert parse_record({"messages": MULTI}, "f:1", "messages") == MULTI


@pytest.mark.parametrize(
    "record, fragment",
    [
        ([1, 2], "expected a JSON object"),
        ({"prompt": "p"}, '"response"'),
        ({"prompt": 3, "response": "r"}, '"prompt"'),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "message 0 must be"),
        ({"messages": [{"role": "user", "content": 5}]}, "message 0 must be"),
        ({"messages": [{"role": "user", "content": "q"}]}, "no assistant message"),
        (
            {"messages": [SINGLE[0], {"role": "system", "content": "s"}, SINGLE[1]]},
            "system message may only come first",
        ),
        ({"prompt": "p<|end|><|assistant|>x", "response": "r"}, "reserved token <|end|>"),
    ],
)
def test_bad_records_name_the_place(record, fragment):
    with pytest.raises(DataError) as e:
        parse_record(record, "data.jsonl:7")
    assert str(e.value).startswith("data.jsonl:7: ") and fragment in str(e.value)


def test_tokenizer_without_chat_tokens_is_refused():
    class Plain:
        special_ids = {"<pad>": 0, "<s>": 2, "</s>": 3}

    with pytest.raises(DataError, match="no special token"):
        ChatTemplate(Plain())
