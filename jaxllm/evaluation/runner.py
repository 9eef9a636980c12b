"""Task kinds, looked up by name in one table (`KINDS`): each turns a task into batched
requests to a `Backend` — log-likelihoods of continuations, rolling log-likelihoods of whole
texts, or completions — and the answers into a table of (num_fewshot, metric, value, n,
stderr) rows. The backend (`jaxllm/trainers/eval_model.py` for a checkpoint) runs every
request of a task in one batched call: no per-example loop over the model here.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from jaxllm.errors import ConfigError, DataError
from jaxllm.evaluation import metrics, retrieval
from jaxllm.evaluation.tasks import Task, encoder_dir, fill, resolve_data
from jaxllm.evaluation.templates import (
    RETRIEVED,
    Prompt,
    build_prompt,
    choices_and_gold,
    continuation,
)
from jaxllm.tokenizer.chat import END_TOKEN


class Scored(NamedTuple):
    logprob: float  # sum of the continuation's token log-probs
    greedy: bool  # every continuation token is the argmax
    truncated: bool  # the context lost its start to fit


class Rolled(NamedTuple):
    logprob: float  # sum over every token of the text
    tokens: int


class Generation(NamedTuple):
    text: str  # the completion, cut at the first stop string
    truncated: bool


@dataclass(frozen=True)
class GenOptions:
    max_new_tokens: int
    until: tuple[str, ...] = ()
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


class TooLong(Exception):
    """Request `index` does not fit the context (its size and the limit in the message)."""

    def __init__(self, index: int, what: str) -> None:
        super().__init__(what)
        self.index, self.what = index, what


class Backend(Protocol):
    """A model answering requests in batches (texts in; BOS and truncation its own)."""

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[Scored]: ...
    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[Rolled]: ...
    def generate(self, prompts: Sequence[str], opts: GenOptions) -> list[Generation]: ...
    def fits(self, text: str, reserve: int) -> bool: ...


@dataclass
class TaskResult:
    """A task's table, its per-example records and how many prompts were cut."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    truncated: int = 0
    passages_dropped: int = 0  # retrieved passages left out of prompts to fit the context

    def add(
        self, k: int | None, metric: str, values: Sequence[float],
        groups: Sequence[str] | None = None,
    ) -> None:  # fmt: skip
        """A row of the mean of `values`, and with `groups` (one label per value) a row per
        label, named `metric[label]`."""
        self.rows.append({
            "num_fewshot": k, "metric": metric, "value": float(np.mean(values)),
            "n": len(values), "stderr": metrics.mean_stderr(values),
        })  # fmt: skip
        for g in dict.fromkeys(groups or ()):
            self.add(k, f"{metric}[{g}]", [v for v, h in zip(values, groups) if h == g])


def groups_of(task: Task) -> list[str] | None:
    """The `group_by` label of each example (None when the task has no `group_by`)."""
    if not task.spec.group_by:
        return None
    return [fill(f"{{{task.spec.group_by}}}", r) for r in task.examples]


def _call(fn: Callable[..., Any], args: tuple, task: Task, owners: Sequence[int]) -> Any:
    """`fn(*args)`, a backend call; a request that does not fit names its example's file:line."""
    try:
        return fn(*args)
    except TooLong as e:
        raise DataError(f"{task.examples[owners[e.index]][0]}: {e.what}") from None


def run_multiple_choice(task: Task, backend: Backend, ks: Sequence[int]) -> TaskResult:
    """acc, acc_norm and brier_score (lm-eval's definitions, `metrics`) for each k."""
    res = TaskResult()
    for k in ks:
        prompts = [build_prompt(task, i, k) for i in range(len(task.examples))]
        items = [choices_and_gold(task, r) for r in task.examples]
        pairs, owners = [], []
        for i, (p, (choices, _)) in enumerate(zip(prompts, items)):
            pairs += [(p.text, continuation(task, p, c)) for c in choices]
            owners += [i] * len(choices)
        scored = iter(_call(backend.loglikelihood, (pairs,), task, owners))
        accs = {"acc": [], "acc_norm": [], "brier_score": []}
        for i, (p, (choices, gold)) in enumerate(zip(prompts, items)):
            got = [next(scored) for _ in choices]
            lls = [s.logprob for s in got]
            figures = metrics.choice_accuracy(lls, choices, gold)
            figures["brier_score"] = metrics.brier_score(lls, gold)
            for name, v in figures.items():
                accs[name].append(v)
            res.truncated += any(s.truncated for s in got)
            res.samples.append({"example": task.examples[i][0], "index": i, "num_fewshot": k, "prompt": p.text,
                                "choices": choices, "gold": gold,
                                "logprobs": lls, **figures})  # fmt: skip
        for name, values in accs.items():
            res.add(k, name, values, groups_of(task))
    return res


def run_generate(task: Task, backend: Backend, ks: Sequence[int]) -> TaskResult:
    """Match rate (`exact_match` / `contains`: each example's share of right samples, its
    stderr over examples) and pass@k over `samples` completions per example, for each k
    (number of demonstrations). Completions stop at `until`, `</s>` and `<|end|>` (where an
    SFT model ends its answer, chat or not: as the lm-eval bridge)."""
    spec, res = task.spec, TaskResult()
    until = tuple(dict.fromkeys((*spec.until, "</s>", END_TOKEN)))
    opts = GenOptions(spec.max_new_tokens, until, spec.temperature, spec.top_k, spec.top_p,
                      spec.seed)  # fmt: skip
    match = metrics.MATCHES[spec.match]
    for k in ks:
        prompts = [build_prompt(task, i, k).text for i in range(len(task.examples))]
        owners = [i for i in range(len(prompts)) for _ in range(spec.samples)]
        gens = _call(backend.generate, ([prompts[i] for i in owners], opts), task, owners)
        rates, passes = [], {j: [] for j in spec.pass_at}
        for i, record in enumerate(task.examples):
            refs = _references(task, record)
            outs = gens[i * spec.samples : (i + 1) * spec.samples]
            answers = [metrics.extract(g.text, spec.extract) if spec.extract else g.text
                       for g in outs]  # fmt: skip
            correct = [a is not None and match(a, refs) for a in answers]
            rates.append(sum(correct) / len(correct))  # samples of one example: one value
            for j in spec.pass_at:
                passes[j].append(metrics.pass_at_k(spec.samples, sum(correct), j))
            res.truncated += outs[0].truncated
            res.samples.append({"example": record[0], "index": i, "num_fewshot": k, "prompt": prompts[i],
                                "completions": [g.text for g in outs], "answers": answers,
                                "references": refs, "correct": correct})  # fmt: skip
        groups = groups_of(task)
        res.add(k, "exact_match" if spec.match == "exact" else "contains", rates, groups)
        for j, values in passes.items():
            res.add(k, f"pass@{j}", values, groups)
    return res


def _references(task: Task, record) -> list[str]:
    """The reference answers: a JSON scalar (string, number, true/false) or a non-empty list
    of them, as text (a number as Python prints it, 0.5 → "0.5"; true → "true")."""
    where, obj = record
    ref = obj.get(task.spec.answer)
    refs = ref if isinstance(ref, list) else [ref]
    if not refs or not all(isinstance(r, str | int | float) for r in refs):
        got = "an empty list" if not refs else f"{ref!r}"[:60]
        raise DataError(f"{where}: field '{task.spec.answer}' must be a string, a number or a "
                        f"non-empty list of them, got {got}")  # fmt: skip
    return [json.dumps(r) if isinstance(r, bool) else str(r) for r in refs]


def run_perplexity(task: Task, backend: Backend, ks: Sequence[int]) -> TaskResult:
    """Token perplexity, bits per byte / per character and byte perplexity of the texts,
    each text scored whole (rolling windows past the context); with `group_by` also each
    group's, from its texts' sums."""
    texts = [fill(f"{{{task.spec.text}}}", r) for r in task.examples]
    if not all(texts):
        raise DataError(f"{task.examples[texts.index('')][0]}: empty text")
    rolled = _call(backend.loglikelihood_rolling, (texts,), task, range(len(texts)))
    groups = groups_of(task)
    res = TaskResult()
    for label in [None, *dict.fromkeys(groups or ())]:  # all texts, then each group's
        mine = [i for i in range(len(texts)) if label is None or groups[i] == label]
        figures = metrics.perplexity_figures(
            sum(rolled[i].logprob for i in mine), sum(rolled[i].tokens for i in mine),
            sum(len(texts[i]) for i in mine), sum(len(texts[i].encode("utf-8")) for i in mine),
        )  # fmt: skip
        for name, v in figures.items():
            res.rows.append({"num_fewshot": None, "value": v, "n": len(mine), "stderr": None,
                             "metric": name if label is None else f"{name}[{label}]"})  # fmt: skip
    res.samples = [{"example": r[0], "index": i, "logprob": x.logprob, "tokens": x.tokens}
                   for i, (r, x) in enumerate(zip(task.examples, rolled))]  # fmt: skip
    return res


KINDS: dict[str, Callable[[Task, Backend, Sequence[int]], TaskResult]] = {
    "multiple_choice": run_multiple_choice,
    "generate": run_generate,
    "perplexity": run_perplexity,
}


Embedder = Callable[[Path, str], retrieval.Embed]
"""(encoder checkpoint directory, how messages name it) → its `Embed` (texts → vectors), for
dense retrieval; `stage: eval` passes `trainers.embedder.retrieval_embedder`'s."""


def evaluate(
    task: Task, backend: Backend, num_fewshot: int = -1, embedder: Embedder | None = None
) -> TaskResult:
    """The task's table on `backend`: every k of the task (or `num_fewshot` when >= 0)."""
    ks = task.spec.num_fewshot if num_fewshot < 0 else (num_fewshot,)
    if task.spec.kind == "perplexity":
        ks = (0,)
    if task.spec.retrieval is None:
        return KINDS[task.spec.kind](task, backend, ks)
    task, found = retrieve(task, backend, max(ks), embedder)
    res = KINDS[task.spec.kind](task, backend, ks)
    res.rows += found.rows
    res.passages_dropped = found.passages_dropped
    for s in res.samples:
        s["retrieved"] = found.samples[int(s.get("index", 0))]["retrieved"]
    return res


def _fits(task: Task, backend: Backend, record) -> Callable[[str], bool]:
    """Whether a prompt fits with room for its answer: `max_new_tokens` to generate, or (multiple
    choice) every choice's continuation, so the lowest-ranked passages go first, never the
    start of the prompt (the scorer's left truncation)."""
    if task.spec.kind != "multiple_choice":
        reserve = task.spec.max_new_tokens if task.spec.kind == "generate" else 16
        return lambda p: backend.fits(p, reserve)
    choices, _ = choices_and_gold(task, record)
    chat = task.spec.chat
    return lambda p: all(backend.fits(p + continuation(task, Prompt(p, chat), c), 0)
                         for c in choices)  # fmt: skip


def retrieve(
    task: Task, backend: Backend, shots: int, embedder: Embedder | None = None
) -> tuple[Task, TaskResult]:
    """The task with each record's `context` field holding its top-k passages (as many as
    fit the context with `shots` demonstrations and the answer's room), and a result with
    recall@1 / recall@k (and `recall_at`'s, searched that deep) and the retrieved ids."""
    r, found = task.spec.retrieval, TaskResult()
    if r.k == 0:  # closed book
        examples = [(w, {**obj, RETRIEVED: ""}) for w, obj in task.examples]
        found.samples = [{"retrieved": []} for _ in examples]
        return dataclasses.replace(task, examples=examples), found
    path = resolve_data(r.passages, task.path, "retrieval.passages")
    embed = None
    if r.method == "dense":
        if embedder is None:
            raise ConfigError(f"task file {task.path}: key 'retrieval.method': dense retrieval "
                              "needs an encoder to embed with, which this caller does not give "
                              "(stage eval does)")  # fmt: skip
        embed = embedder(encoder_dir(r.encoder, task.path),
                         f"task file {task.path}: key 'retrieval.encoder'")  # fmt: skip
    index = retrieval.cached_index(str(path), r.id_field, r.text_field, embed)
    top = index.search([fill(r.query, rec) for rec in task.examples], max((r.k, *r.recall_at)))
    examples = list(task.examples)
    for i, (where, obj) in enumerate(task.examples):
        texts = [index.texts[j][: r.passage_chars or None] for j in top[i][: r.k]]
        passages = [
            r.passage_template.format(text=t, id=index.ids[j]) for t, j in zip(texts, top[i])
        ]

        def render(ctx: str, i: int = i, where: str = where, obj: dict = obj) -> str:
            examples[i] = (where, {**obj, RETRIEVED: ctx})
            return build_prompt(dataclasses.replace(task, examples=examples), i, shots).text

        _, dropped = retrieval.place_passages(passages, render, _fits(task, backend, (where, obj)))
        found.passages_dropped += dropped
        found.samples.append({"retrieved": [index.ids[j] for j in top[i]]})
    if r.gold:
        gold = [str(obj.get(r.gold)) for _, obj in task.examples]
        ids = [s["retrieved"] for s in found.samples]
        for k in sorted({1, r.k, *r.recall_at}):
            found.add(None, f"recall@{k}", retrieval.recall_at_k(ids, gold, k), groups_of(task))
    return dataclasses.replace(task, examples=examples), found
