"""`stage: generate` with `generate.chat`: prompts become user turns of the chat template,
token for token what SFT trains on, and answers stop at <|end|>."""

import json

import pytest

from jaxllm.config import GenerateConfig, from_dict
from jaxllm.rundir import RunDir
from jaxllm.tokenizer.chat import ChatTemplate
from jaxllm.trainers import generate


def test_chat_prompts_are_the_sft_prompt_ids(tok):
    gen = GenerateConfig(chat=True, system="Be brief.", stop=("</s>",))
    texts, out = generate.chat_prompts(["2 + 3 = ?", "除夕夜应该吃什么呢？"], gen)
    template = ChatTemplate(tok)
    for text, q in zip(texts, ["2 + 3 = ?", "除夕夜应该吃什么呢？"]):
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}]
        assert tok.encode(text, add_bos=out.add_bos) == template.prompt_ids(messages)
    # an answer ends at <|end|> or any other structural string (a role tag would start a turn)
    roles = ("<|system|>", "<|user|>", "<|assistant|>")
    assert out.stop == ("</s>", "<|end|>", "<s>", *roles) and not out.add_bos
    plain, same = generate.chat_prompts(["x"], GenerateConfig())
    assert plain == ["x"] and same == GenerateConfig()


def test_generate_stage_with_chat(tmp_path, tiny_ckpt):
    cfg = from_dict({
        "stage": "generate", "output_dir": str(tmp_path / "g"), "progress": False,
        "inputs": {"checkpoint": str(tiny_ckpt)},
        "generate": {"prompts": ["2 + 3 = ?"], "chat": True, "system": "Be brief.",
                     "max_new_tokens": 6},
    })  # fmt: skip
    run_dir = RunDir.open(cfg)
    summary = run_dir.finish(generate.run(cfg, run_dir))
    row = json.loads((tmp_path / "g/generations.jsonl").read_text())
    assert row["prompt"] == "2 + 3 = ?" and summary["prompts"] == 1
    assert not any(t in row["completion"] for t in ("<|end|>", "<|user|>", "<|assistant|>"))


def test_system_prompt_needs_chat():
    with pytest.raises(Exception, match="system prompt needs chat: true"):
        from_dict({"stage": "generate", "generate": {"system": "hi"}})
