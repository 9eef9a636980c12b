"""A jaxllm checkpoint as an lm-evaluation-harness model (`--model jaxllm`).

`loglikelihood`, `loglikelihood_rolling` and `generate_until` run on the same `EvalModel` as
`stage: eval` (the jitted scorer and the KV-cache sampler, batched, on the mesh), so the two
give the same numbers on the same prompts. lm-eval finds models in its own registry only;
importing this module registers `jaxllm` there, which `python -m jaxllm.harness` (lm-eval's
command line with the model registered) does first:

    python -m jaxllm.harness run --model jaxllm \\
        --model_args checkpoint=runs/tiny/5-tiny_sft/checkpoints,batch_size=32 \\
        --tasks my_task --include_path my_tasks/

Model arguments: `checkpoint` (required), `tokenizer` (default: the checkpoint's),
`max_length` (default: the model's context), `truncation` (left/error), `batch_size`, and
the mesh's `data` / `fsdp` / `tensor` sizes and `rules`. `--apply_chat_template` renders
conversations with jaxllm's chat template.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from jaxllm.config import MeshConfig
from jaxllm.evaluation.runner import GenOptions
from jaxllm.tokenizer.chat import END_TOKEN, render_text
from jaxllm.trainers.eval_model import EvalModel

DEFAULT_MAX_GEN = 256


@register_model("jaxllm")
class JaxLLM(LM):
    """lm-eval's model interface over `EvalModel` (requests in lm-eval's order, every one
    answered in a batched call)."""

    def __init__(
        self, checkpoint: str, tokenizer: str = "", batch_size: int | str = 16,
        max_length: int = 0, truncation: str = "left", data: int = -1, fsdp: int = 1,
        tensor: int = 1, rules: str = "dp", **_ignored: Any,
    ) -> None:  # fmt: skip
        super().__init__()
        size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        mesh = MeshConfig(data=int(data), fsdp=int(fsdp), tensor=int(tensor), rules=rules)
        self.model = EvalModel.load(
            checkpoint, tokenizer=tokenizer, mesh=mesh, max_len=int(max_length),
            batch_size=size, truncation=truncation,
        )  # fmt: skip

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        scored = self.model.loglikelihood([r.args for r in requests])
        return [(s.logprob, s.greedy) for s in scored]

    def loglikelihood_rolling(self, requests) -> list[float]:
        return [r.logprob for r in self.model.loglikelihood_rolling([r.args[0] for r in requests])]

    def generate_until(self, requests) -> list[str]:
        """Requests grouped by their generation settings; each group is one batched call."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[GenOptions, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(gen_options(r.args[1]), []).append(i)
        for opts, idx in groups.items():
            gens = self.model.generate([requests[i].args[0] for i in idx], opts)
            for i, g in zip(idx, gens):
                out[i] = g.text
        return out  # type: ignore[return-value]

    @property
    def tokenizer_name(self) -> str:
        return "jaxllm"

    def chat_template(self, chat_template: bool | str = False) -> str:
        return "jaxllm"

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return render_text(chat_history, add_generation_prompt=add_generation_prompt)


def gen_options(kwargs: dict[str, Any]) -> GenOptions:
    """lm-eval's generation kwargs (`until`, `max_gen_toks`, `do_sample`, `temperature`,
    `top_k`, `top_p`) as the sampler's options; greedy unless sampling is asked for."""
    kw = dict(kwargs or {})
    until = kw.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(kw.pop("temperature", 0.0) or 0.0)
    if not kw.pop("do_sample", temperature > 0):
        temperature = 0.0
    stops = tuple(dict.fromkeys([*until, "</s>", END_TOKEN]))
    return GenOptions(
        max_new_tokens=int(kw.pop("max_gen_toks", DEFAULT_MAX_GEN)), until=stops,
        temperature=temperature, top_k=int(kw.pop("top_k", 0) or 0),
        top_p=float(kw.pop("top_p", 1.0) or 1.0), seed=int(kw.pop("seed", 0) or 0),
    )  # fmt: skip
