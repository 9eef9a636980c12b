"""Evaluation tasks: declared in YAML, looked up by name in one registry.

A task file (the shipped ones: `jaxllm/assets/eval/<name>.yaml`; your own: any path) names its
`kind` (a key of the runner registry: multiple_choice, generate, perplexity), its data (JSONL,
relative to the YAML file or `asset:...`) and how an example becomes a prompt (`template`
with named fields, e.g. `"Q: {question}\\nA:"`; see `templates.py`). A task name may carry a
variant: `rl_sums:cot` is `rl_sums` with its `cot` block (a chain-of-thought template, the
demonstrations' worked answers and the regex that extracts the answer) applied.

Loading is strict and says where: an unknown or missing key names the task file and key, a
record lacking a field the templates need names `data file:line`, and more demonstrations
than the few-shot split holds names the key `num_fewshot`.
"""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from jaxllm.config import resolve_path
from jaxllm.config.load import _convert
from jaxllm.errors import ConfigError, DataError
from jaxllm.jsonl import read_jsonl

SHIPPED = resolve_path("asset:eval")
Kind = Literal["multiple_choice", "generate", "perplexity"]


@dataclass(frozen=True)
class CotSpec:
    """A chain-of-thought variant: what replaces the task's own keys under `name:cot`."""

    template: str = ""  # the question, asking for the reasoning (empty: the task's)
    target: str = ""  # a demonstration's worked answer, e.g. "<think>{trace}</think>{answer}"
    instruction: str = ""
    extract: str = r"</think>\s*(-?\d+)"  # the final answer in the completion
    max_new_tokens: int = 64


@dataclass(frozen=True)
class RetrievalSpec:
    """Retrieval-augmented prompts: the top-k passages for each example's `query` (BM25, or
    dense: cosine similarity of an encoder checkpoint's mean-pooled vectors) fill the
    `{context}` field of its template (as many as fit the model's context, in rank order).
    `name:closed` is the same task with no passages (closed book)."""

    passages: str  # JSONL (gzip ok) of {"id", "text"}; relative to the task file or asset:
    k: int = 1
    method: Literal["bm25", "dense"] = "bm25"
    encoder: str = ""  # dense: an encoder checkpoint directory (stage mlm/import/classify)
    query: str = "{question}"  # what is searched for
    passage_template: str = "Passage: {text}\n"  # one passage in the context
    gold: str = ""  # a record field with the gold passage id: recall@k is reported
    recall_at: tuple[int, ...] = ()  # more recall@n figures (searched that deep; k go in)
    passage_chars: int = 0  # each passage cut to this many characters (0: whole)
    id_field: str = "id"
    text_field: str = "text"

    def _validate(self) -> None:
        if self.k < 0 or self.passage_chars < 0:
            raise ValueError(f"k: need k >= 0 and passage_chars >= 0, got {self.k}")
        if any(n < 1 for n in self.recall_at):
            raise ValueError(f"recall_at: need n >= 1, got {list(self.recall_at)}")
        if (self.method == "dense") != bool(self.encoder):
            raise ValueError("encoder: method dense needs an encoder checkpoint (and bm25 none)")


@dataclass(frozen=True)
class TaskSpec:
    """One task file. Field names in templates are keys of the data's JSON records."""

    name: str
    kind: Kind
    data: str  # JSONL: the evaluated examples
    description: str = ""
    fewshot_data: str = ""  # JSONL: the split demonstrations are drawn from
    fewshot_field: str = ""  # or a per-record list of demonstrations (records themselves)
    num_fewshot: tuple[int, ...] = (0,)  # several: each is a row of the task's table
    seed: int = 1234  # draws the demonstrations
    instruction: str = ""  # once, before the demonstrations
    template: str = "{question}"  # the prompt of one example
    target: str = "{answer}"  # a demonstration's answer (multiple choice: the gold choice)
    target_delimiter: str = " "  # between a prompt and its answer or choice
    fewshot_delimiter: str = "\n\n"  # between demonstrations
    choices: str = "choices"  # multiple choice: the field with the list of choices
    gold: str = "gold"  # ... and the field with the gold index (or the gold choice itself)
    answer: str = "answer"  # generate: the field with the reference answer(s)
    match: Literal["exact", "contains"] = "exact"
    extract: str = ""  # a regex; its first group of the last match is the answer
    max_new_tokens: int = 32
    until: tuple[str, ...] = ("\n",)  # stop strings (plus </s> and <|end|>)
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    samples: int = 1  # completions per example (pass@k needs k <= samples)
    pass_at: tuple[int, ...] = (1,)
    text: str = "text"  # perplexity: the field with the text
    group_by: str = ""  # a record field: each metric also per value of it, as metric[value]
    chat: bool = False  # prompts as user turns of the chat template, demonstrations as turns
    system: str = ""  # with chat: a system prompt
    cot: CotSpec | None = None
    retrieval: RetrievalSpec | None = None

    def _validate(self) -> None:
        if min(self.num_fewshot, default=0) < 0 or not self.num_fewshot:
            raise ValueError(f"num_fewshot: need counts >= 0, got {list(self.num_fewshot)}")
        if self.samples < 1 or any(not 1 <= k <= self.samples for k in self.pass_at):
            raise ValueError(f"pass_at: each k must be in 1..samples ({self.samples})")
        if self.samples > 1 and self.temperature == 0:
            raise ValueError("samples: several samples per example need temperature > 0")
        if self.system and not self.chat:
            raise ValueError("system: a system prompt needs chat: true")
        if self.fewshot_data and self.fewshot_field:
            raise ValueError("fewshot_data: give a few-shot file or a per-record field, not both")


Record = tuple[str, dict[str, Any]]  # ("file:line", the JSON object)


@dataclass(frozen=True)
class Task:
    """A loaded task: its spec (variant applied), where it came from, and its records."""

    name: str
    spec: TaskSpec
    path: Path
    examples: list[Record]
    fewshot: list[Record] = field(default_factory=list)


def registry() -> dict[str, Path]:
    """The shipped tasks: name (the file's stem, which is also its `name`) → task file."""
    return {p.stem: p for p in sorted(SHIPPED.glob("*.yaml"))}


def load_task(name: str, limit: int = 0) -> Task:
    """A task by registry name or path (`.yaml`), with an optional `:variant`; at most
    `limit` examples (0: all)."""
    base, _, variant = name.partition(":")
    path = Path(base) if base.endswith((".yaml", ".yml")) else registry().get(base)
    if path is None or not path.is_file():
        known = ", ".join(registry())
        raise ConfigError(
            f"config key 'eval.tasks': no task '{base}' (shipped: {known}; or a path)"
        )
    spec = with_variant(read_spec(path), variant, path)
    examples = read_records(resolve_data(spec.data, path, "data"))
    examples = examples[:limit] if limit else examples
    fewshot = (
        read_records(resolve_data(spec.fewshot_data, path, "fewshot_data"))
        if spec.fewshot_data
        else []
    )
    label = spec.name + (f":{variant}" if variant else "")
    if spec.retrieval is not None:  # the store (and encoder) must exist whatever k is
        resolve_data(spec.retrieval.passages, path, "retrieval.passages")
        if spec.retrieval.encoder:
            encoder_dir(spec.retrieval.encoder, path)
    return Task(label, spec, path, examples, fewshot)


def read_spec(path: Path) -> TaskSpec:
    """A task file as a `TaskSpec`; every message names the file and the key."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"task file {path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"task file {path}: expected a mapping of keys")
    if isinstance(raw.get("num_fewshot"), int):
        raw["num_fewshot"] = [raw["num_fewshot"]]
    try:
        return _convert(TaskSpec, raw, "")
    except ConfigError as e:
        raise ConfigError(f"task file {path}: {str(e).replace('config key', 'key')}") from None


def with_variant(spec: TaskSpec, variant: str, path: Path) -> TaskSpec:
    """The spec with a named variant applied: `cot` (its `cot:` block) or `closed` (its
    `retrieval:` block with no passages)."""
    if not variant:
        return spec
    if variant == "closed" and spec.retrieval is not None:
        return dataclasses.replace(spec, retrieval=dataclasses.replace(spec.retrieval, k=0))
    if variant != "cot" or spec.cot is None:
        raise ConfigError(
            f"task file {path}: no variant '{variant}' (a `cot:` block makes 'cot', a "
            "`retrieval:` block 'closed')"
        )
    c = spec.cot
    keys = {"template": c.template, "target": c.target, "instruction": c.instruction}
    return dataclasses.replace(
        spec, **{k: v for k, v in keys.items() if v}, extract=c.extract,
        max_new_tokens=c.max_new_tokens, until=tuple(u for u in spec.until if u != "\n"),
    )  # fmt: skip


def resolve_data(value: str, task_file: Path, key: str) -> Path:
    """A data path of a task file: `asset:...`, absolute, or relative to the task file."""
    path = resolve_path(value)
    if not path.is_absolute() and not value.startswith("asset:"):
        path = task_file.parent / path
    if not path.is_file():
        raise ConfigError(f"task file {task_file}: key '{key}': {path} not found")
    return path


def encoder_dir(value: str, task_file: Path) -> Path:
    """A dense retriever's encoder checkpoint directory (relative to the working directory,
    like `inputs.checkpoint`)."""
    path = resolve_path(value)
    if not path.is_dir():
        raise ConfigError(f"task file {task_file}: key 'retrieval.encoder': {path} not found")
    return path


def read_records(path: Path) -> list[Record]:
    records = [(f"{path}:{n}", obj) for n, obj in read_jsonl(path)]
    if not records:
        raise DataError(f"{path}: no records")
    return records


def template_fields(template: str) -> list[str]:
    """The field names a template uses (`{question}` → question; `{{` is a literal brace)."""
    return [f.split(".")[0].split("[")[0] for _, f, _, _ in string.Formatter().parse(template) if f]


def fill(template: str, record: Record) -> str:
    """The template with the record's fields; a missing field names `file:line`."""
    where, obj = record
    for name in template_fields(template):
        if name not in obj:
            raise DataError(
                f"{where}: the template {template!r} names field '{name}', which this record "
                f"lacks (its fields: {', '.join(obj)})"
            )
    try:
        return template.format_map(obj)
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        raise DataError(f"{where}: the template {template!r} cannot be filled: {e}") from None
