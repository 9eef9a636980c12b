"""Config sections of `stage: eval` (the task harness) and `stage: chat` (the REPL)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from jaxllm.config.checks import at_least, sampling


@dataclass(frozen=True)
class EvalModelConfig:
    """One checkpoint to evaluate, under a short name used in the summary and the plot."""

    name: str
    checkpoint: str

    def _validate(self) -> None:
        for key in ("name", "checkpoint"):
            if not getattr(self, key):
                raise ValueError(f"{key}: must not be empty")


@dataclass(frozen=True)
class EvalConfig:
    """`stage: eval` — tasks by name (the shipped `jaxllm/assets/eval/*.yaml`) or by path to a
    task YAML of your own; every task runs on every model of `models` (empty: the one in
    `inputs.checkpoint`)."""

    tasks: tuple[str, ...] = (
        "arith_mc", "arith_gen", "arith_chat", "symbol_map", "verse_mc", "poem_mc", "sums",
        "sums:cot", "verse_ppl",
    )  # fmt: skip
    models: tuple[EvalModelConfig, ...] = ()
    batch_size: int = 16  # rows scored / prompts sampled together (split over the mesh)
    limit: int = 0  # examples per task (0: all); the first `limit` of the data file
    num_fewshot: int = -1  # -1: each task's own; else every task with this many demonstrations
    max_len: int = 0  # context in tokens (0: the model's max_seq_len)
    # a prompt longer than the context: `left` cuts its start (keeps the end, where the
    # question is; counted per task in the summary as `truncated`), `error` stops naming it
    truncation: Literal["left", "error"] = "left"
    samples: int = 8  # per-example records written to samples/<task>.jsonl (0: none, -1: all)

    def _validate(self) -> None:
        if not self.tasks:
            raise ValueError("tasks: name at least one task")
        at_least(self, 1, "batch_size")
        at_least(self, 0, "limit", note=" (0: every record)")
        at_least(self, 0, "max_len", note=" (0: the model's max_seq_len)")
        if self.samples < -1:
            raise ValueError(f"samples: -1 (all), 0 (none) or a count, got {self.samples}")
        if self.num_fewshot < -1:
            raise ValueError(f"num_fewshot: -1 (the tasks' own) or >= 0, got {self.num_fewshot}")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models: names must differ, got {names}")


@dataclass(frozen=True)
class ChatConfig:
    """`stage: chat` — an interactive conversation with the chat template on stdin/stdout."""

    system: str = ""  # the system prompt (`/system <text>` changes it)
    prompt: str = ""  # or a system prompt from the library (jaxllm/assets/prompts/<name>.yaml)
    max_new_tokens: int = 64
    temperature: float = 0.7  # 0: greedy
    top_k: int = 40
    top_p: float = 0.95
    max_turns: int = 0  # stop after this many answers (0: until `exit` or end of input)
    stream: int = 8  # tokens sampled per call, printed as each call returns

    def _validate(self) -> None:
        if self.system and self.prompt:
            raise ValueError(
                f"system: set beside the library prompt chat.prompt ({self.prompt!r}); keep one "
                "(--set \"chat.prompt=''\" clears the library prompt)"
            )
        sampling(self)
        at_least(self, 1, "max_new_tokens", "stream")
        at_least(self, 0, "max_turns", note=" (0: until `exit` or end of input)")
