"""`stage: eval` — every task of `eval.tasks` on every checkpoint of `eval.models` (or the one
in `inputs.checkpoint`): multiple choice by log-likelihood, generation with exact match /
contains / a regex extractor and pass@k, perplexity; few-shot, chain-of-thought (`task:cot`)
and retrieval-augmented (a task's `retrieval:` block: BM25, or dense with an encoder
checkpoint's mean-pooled vectors) prompts.

Writes `summary.json` (`tasks.<task>.rows`: one row per model, num_fewshot and metric with
value, n and standard error; `truncated` per model), `results.md` (the same as Markdown
tables), `samples/<model>/<task>.jsonl` (per-example prompts, choices or completions, and
whether each was right) and, when a task has several num_fewshot, `fewshot.png` (the metric
against k, a line per model).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax

from jaxllm.config import Config, EvalModelConfig
from jaxllm.errors import ConfigError
from jaxllm.evaluation.runner import TaskResult, evaluate
from jaxllm.evaluation.tasks import Task, load_task
from jaxllm.rundir import RunDir, atomic_write_text
from jaxllm.sharding import make_mesh
from jaxllm.trainers.embedder import retrieval_embedder
from jaxllm.trainers.eval_model import EvalModel

HEADLINE = ("acc", "exact_match", "contains", "token_perplexity")  # the plot's metric


def models_of(cfg: Config) -> list[EvalModelConfig]:
    """`eval.models`, or the input checkpoint under the name `model`."""
    if cfg.eval.models:
        return list(cfg.eval.models)
    if not cfg.inputs.checkpoint:
        raise ConfigError(
            "config key 'eval.models': give models [{name, checkpoint}] or inputs.checkpoint"
        )
    return [EvalModelConfig("model", cfg.inputs.checkpoint)]


def run(cfg: Config, run_dir: RunDir) -> dict[str, Any]:
    ev = cfg.eval
    tasks = [load_task(name, ev.limit) for name in ev.tasks]  # bad task files fail first
    results: dict[str, dict[str, TaskResult]] = {t.name: {} for t in tasks}
    seconds: dict[str, float] = {}  # "model/task" -> wall seconds (`seconds` is the run's)
    embedder = retrieval_embedder(make_mesh(cfg.mesh), cfg.mesh.rules)  # loads on first use
    for m in models_of(cfg):
        backend = EvalModel.load(
            m.checkpoint, tokenizer=cfg.inputs.tokenizer, mesh=cfg.mesh, max_len=ev.max_len,
            batch_size=ev.batch_size, truncation=ev.truncation, quantize=cfg.quantize,
        )  # fmt: skip
        for task in tasks:
            t0 = time.perf_counter()
            results[task.name][m.name] = evaluate(task, backend, ev.num_fewshot, embedder)
            seconds[f"{m.name}/{task.name}"] = round(time.perf_counter() - t0, 2)
        del backend
    summary = {"tasks": {t.name: task_summary(t, results[t.name]) for t in tasks},
               "task_seconds": seconds}  # fmt: skip
    if jax.process_index() == 0:
        write_outputs(run_dir.path, tasks, results, ev.samples)
    summary["outputs"] = {"results": str(run_dir.path / "results.md"),
                          "samples": str(run_dir.path / "samples")}  # fmt: skip
    return summary


def task_summary(task: Task, by_model: dict[str, TaskResult]) -> dict[str, Any]:
    return {
        "kind": task.spec.kind,
        "examples": len(task.examples),
        "rows": [{"model": name, **row} for name, r in by_model.items() for row in r.rows],
        "truncated": {name: r.truncated for name, r in by_model.items()},
        **({"passages_dropped": {name: r.passages_dropped for name, r in by_model.items()}}
           if task.spec.retrieval is not None else {}),
    }  # fmt: skip


def markdown(task: Task, by_model: dict[str, TaskResult]) -> str:
    lines = [f"### {task.name}", "", task.spec.description, "",
             "| model | k | metric | value | ± stderr | n |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in by_model.items():
        for row in r.rows:
            err = "" if row["stderr"] is None else f"{row['stderr']:.3f}"
            k = "" if row["num_fewshot"] is None else row["num_fewshot"]
            lines.append(
                f"| {name} | {k} | {row['metric']} | {row['value']:.4g} | {err} | {row['n']} |"
            )
    cut = {n: r.truncated for n, r in by_model.items() if r.truncated}
    if cut:
        lines += ["", f"Prompts cut from the left to fit the context: {cut}"]
    return "\n".join(lines) + "\n"


def write_outputs(
    out: Path, tasks: list[Task], results: dict[str, dict[str, TaskResult]], samples: int
) -> None:
    atomic_write_text(out / "results.md", "\n".join(markdown(t, results[t.name]) for t in tasks))
    for task in tasks:
        for name, r in results[task.name].items():
            keep = r.samples if samples < 0 else r.samples[:samples]
            if keep:
                path = out / "samples" / name / f"{task.name.replace(':', '_')}.jsonl"
                path.parent.mkdir(parents=True, exist_ok=True)
                text = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in keep)
                atomic_write_text(path, text)
    multi = fewshot_tasks(tasks, results)
    if multi:
        plot_fewshot(out / "fewshot.png", multi, results)


def fewshot_tasks(tasks: list[Task], results: dict[str, dict[str, TaskResult]]) -> list[Task]:
    """The tasks measured at more than one k (rows without a k, such as retrieval recall, do
    not count): those `fewshot.png` plots."""
    return [t for t in tasks if len({row["num_fewshot"] for r in results[t.name].values()
                                     for row in r.rows if row["num_fewshot"] is not None}) > 1]  # fmt: skip


def plot_fewshot(path: Path, tasks: list[Task], results: dict[str, dict[str, TaskResult]]) -> None:
    """One panel per task: the headline metric against the number of demonstrations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for name, r in results[task.name].items():
            metric = next(m for m in (*HEADLINE, r.rows[0]["metric"])
                          if any(row["metric"] == m for row in r.rows))  # fmt: skip
            rows = sorted((row for row in r.rows
                           if row["metric"] == metric and row["num_fewshot"] is not None),
                          key=lambda row: row["num_fewshot"])  # fmt: skip
            ax.errorbar([row["num_fewshot"] for row in rows], [row["value"] for row in rows],
                        yerr=[row["stderr"] or 0 for row in rows], marker="o", capsize=3,
                        label=f"{name} ({metric})")  # fmt: skip
        ax.set_title(task.name)
        ax.set_xlabel("demonstrations k")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
