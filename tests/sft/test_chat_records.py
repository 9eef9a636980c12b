"""Tool results are the environment's (loss mask 0, as GRPO's env appends them), malformed
records are refused with file:line, and eval encodes chat prompts as SFT trained on them
(no extra EOS first for a model without a BOS)."""

import json

import pytest

from jaxllm.data.sft import SFTRecords, example_features
from jaxllm.errors import DataError
from jaxllm.tokenizer.chat import ChatTemplate, render_text
from jaxllm.trainers.eval_model import EvalModel
from tests.test_jsonl import assert_one_line_at
from tests.tokenizer.test_hf_tokenizer import EOT, make

CALL, RESULT, ANSWER = "<tool>876 + 530</tool>", "<result>1406</result>", "1406"
TOOL_CHAT = [
    {"role": "user", "content": "What is 876 + 530?"},
    {"role": "assistant", "content": CALL + RESULT + ANSWER},
]


def test_tool_results_are_context_not_targets(template):
    enc = template.tok.encode
    r = template.render(TOOL_CHAT)
    head = len(enc(render_text(TOOL_CHAT[:1], add_generation_prompt=True)))  # …<|assistant|>
    # by hand: the call is learnt, the result (tags included) is not, the answer is
    want = [0] * head + [1] * len(enc(CALL)) + [0] * len(enc(RESULT)) + [1] * len(enc(ANSWER))
    assert r.mask == want + [1, 1]  # <|end|> </s>
    assert r.ids == enc(render_text(TOOL_CHAT))
    at = head + len(enc(CALL))
    assert r.ids[at : at + len(enc(RESULT))] == enc(RESULT)  # what GRPO's env appends
    f = example_features(TOOL_CHAT, template, train_on_prompt=False)
    learnt = template.tok.decode(f["targets"][f["loss_mask"] == 1])
    assert learnt == CALL + ANSWER + "<|end|></s>"
    assert template.render(TOOL_CHAT, train_on_prompt=True).mask == [0] + [1] * (len(r.ids) - 1)
    # only complete pairs inside an assistant turn: a user's result, a stray tag stay as they are
    stray = [{"role": "user", "content": RESULT}, {"role": "assistant", "content": "<result>9"}]
    r = template.render(stray)
    assert template.tok.decode([i for i, m in zip(r.ids, r.mask) if m]) == "<result>9<|end|></s>"


BAD = {
    "both shapes": ({"prompt": "p", "response": "r", "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        'both "messages" and "prompt"'),
    "system beside messages": ({"system": "s", "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        'both "messages" and "system"'),
    "system not a string": ({"system": ["French"], "prompt": "p", "response": "r"},
                            '"system" must be a string, got list'),
    "system null": ({"system": None, "prompt": "p", "response": "r"},
                    '"system" must be a string'),
    "empty response": ({"prompt": "p", "response": ""}, "no text to learn"),
    "blank assistant turn": ({"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": " \n"},
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        "message 1: an assistant message with no text"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_malformed_records_name_file_and_line(tmp_path, case):
    record, why = BAD[case]
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "p", "response": "r", "system": ""})
    path.write_text(f"{good}\n{json.dumps(record)}\n")
    records = SFTRecords([path])
    assert records[0][0] == {"role": "system", "content": ""}  # a string system is kept
    with pytest.raises(DataError) as e:
        records[1]
    assert_one_line_at(e.value, f"{path}:2")
    assert why in str(e.value)


@pytest.mark.parametrize("bos", [None, EOT])  # Qwen2 (no BOS), GPT-2 (BOS = EOS)
def test_eval_encodes_chat_prompts_as_sft_trained_and_plain_text_after_a_bos(tmp_path, bos):
    tok = make(tmp_path / "hf", bos)
    model = object.__new__(EvalModel)  # only the tokenizer side, no weights
    model.tok, model.bos = tok, tok.bos_id if tok.bos_id >= 0 else tok.eos_id
    chat = [{"role": "user", "content": "hello"}]
    prompt = ChatTemplate(tok).prompt_ids(chat)  # what SFT trained, chat/serve prompt
    assert model.encode_context(render_text(chat, add_generation_prompt=True)) == prompt
    assert prompt[0] == (tok.piece_to_id("<|user|>") if bos is None else tok.eos_id)
    eot = tok.piece_to_id(EOT)  # plain text: the prefix token first, as lm-eval rolls a text
    assert model.encode_context("hello world") == [eot, *tok.encode("hello world")]
    ctx, cont = model.encode_pair(render_text(chat, add_generation_prompt=True), "world")
    assert ctx == prompt and cont == tok.encode("world")
