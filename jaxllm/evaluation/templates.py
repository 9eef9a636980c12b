"""Prompts of evaluation examples: an instruction prefix, `k` demonstrations drawn with the
task's seed from the few-shot split (never the evaluated example itself), then the example;
as plain text, or as turns of the chat template (`generate.chat`-style: each demonstration a
user turn and an assistant answer, the example the last user turn).

Plain prompt (lm-evaluation-harness's layout)::

    {instruction}{fewshot_delimiter}
    {template(demo 1)}{target_delimiter}{answer(demo 1)}{fewshot_delimiter}
    ...
    {template(example)}

A multiple-choice continuation is `{target_delimiter}{choice}` (with chat: the bare choice
after `<|assistant|>`); a demonstration's answer there is its gold choice.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from jaxllm.errors import ConfigError, DataError
from jaxllm.evaluation.tasks import Record, Task, fill
from jaxllm.tokenizer.chat import render_text


def choices_and_gold(task: Task, record: Record) -> tuple[list[str], int]:
    """A multiple-choice record's choices and gold index (the gold field holds an index or
    the gold choice itself)."""
    where, obj = record
    spec = task.spec
    for key in (spec.choices, spec.gold):
        if key not in obj:
            raise DataError(f"{where}: no field '{key}' (multiple choice needs choices and gold)")
    choices, gold = obj[spec.choices], obj[spec.gold]
    if (
        not isinstance(choices, list)
        or len(choices) < 2
        or not all(isinstance(c, str) and c for c in choices)
    ):
        raise DataError(f"{where}: field '{spec.choices}' must be a list of >= 2 strings")
    if isinstance(gold, str) and gold in choices:
        gold = choices.index(gold)
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise DataError(f"{where}: field '{spec.gold}' must index the choices or be one of them")
    return choices, gold


def demo_answer(task: Task, record: Record) -> str:
    if task.spec.kind == "multiple_choice":
        choices, gold = choices_and_gold(task, record)
        return choices[gold]
    return fill(task.spec.target, record)


def fewshot_pool(task: Task, record: Record) -> list[Record]:
    """Where this example's demonstrations come from: the few-shot split, or its own list."""
    spec = task.spec
    if not spec.fewshot_field:
        return task.fewshot
    where, obj = record
    demos = obj.get(spec.fewshot_field)
    if not isinstance(demos, list) or not all(isinstance(d, dict) for d in demos):
        raise DataError(f"{where}: field '{spec.fewshot_field}' must be a list of records")
    return [(f"{where} ({spec.fewshot_field}[{i}])", d) for i, d in enumerate(demos)]


RETRIEVED = "context"  # the field a retrieval task's passages are written into (runner.py)


def draw_fewshot(task: Task, index: int, k: int) -> list[Record]:
    """`k` demonstrations for example `index`, drawn with `Random(f"{seed}:{index}")` (the
    same ones whatever else is evaluated) from its pool minus any copy of the example (with
    retrieval, a copy up to the `context` field the passages were written into)."""
    if k == 0:
        return []
    record = task.examples[index]
    key = _without_retrieved if task.spec.retrieval is not None else (lambda obj: obj)
    own = key(record[1])
    pool = [r for r in fewshot_pool(task, record) if key(r[1]) != own]
    if len(pool) < k:
        source = task.spec.fewshot_data or f"{record[0]} field '{task.spec.fewshot_field}'"
        if not task.spec.fewshot_data and not task.spec.fewshot_field:
            source = "no few-shot split (set fewshot_data or fewshot_field)"
        raise ConfigError(
            f"task file {task.path}: key 'num_fewshot': {k} demonstrations asked, but the "
            f"few-shot split has {len(pool)} usable examples ({source})"
        )
    return random.Random(f"{task.spec.seed}:{index}").sample(pool, k)


def _without_retrieved(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k != RETRIEVED}


@dataclass(frozen=True)
class Prompt:
    """An example's context text and whether it is a chat-template rendering."""

    text: str
    chat: bool


def build_prompt(task: Task, index: int, k: int) -> Prompt:
    """The context for example `index` with `k` demonstrations."""
    spec, record = task.spec, task.examples[index]
    demos = [(fill(spec.template, d), demo_answer(task, d)) for d in draw_fewshot(task, index, k)]
    query = fill(spec.template, record)
    if spec.chat:
        return Prompt(chat_text(spec.system, spec.instruction, demos, query), chat=True)
    parts = [f"{q}{spec.target_delimiter}{a}" for q, a in demos] + [query]
    head = [spec.instruction] if spec.instruction else []
    return Prompt(spec.fewshot_delimiter.join(head + parts), chat=False)


def chat_text(system: str, instruction: str, demos: list[tuple[str, str]], query: str) -> str:
    """The chat-template text: system, demonstrations as user/assistant turns, the query as
    the last user turn (the instruction before the first user turn's text)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for q, a in demos:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": query})
    first = 1 if system else 0
    if instruction:
        messages[first] = {
            "role": "user",
            "content": f"{instruction}\n{messages[first]['content']}",
        }
    return render_text(messages, add_generation_prompt=True)


def continuation(task: Task, prompt: Prompt, choice: str) -> str:
    """What a multiple-choice choice is scored as after the prompt."""
    return choice if prompt.chat else f"{task.spec.target_delimiter}{choice}"
