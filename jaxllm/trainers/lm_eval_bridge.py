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
`max_length` (default: the model's context), `truncation` (left/error), `batch_size` (wins
over lm-eval's `--batch_size`, which is used otherwise: its default is 1), and the mesh's
`data` / `fsdp` / `tensor` sizes and `rules`. `--apply_chat_template` renders conversations
with jaxllm's chat template. A generation request without `max_gen_toks` gets 256 new tokens,
or the room its prompt leaves in the context when that is less (a prompt that fills the
context alone: half the context, the prompt losing its start, as lm-eval's HF model does).
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from jaxllm.config import MeshConfig
from jaxllm.errors import DataError
from jaxllm.evaluation.runner import GenOptions, TooLong
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

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """`--model_args` and lm-eval's own flags; a key in both (`batch_size`) takes
        `--model_args`' value (lm-eval's base class passes both and fails)."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        extra = {k: v for k, v in (additional_config or {}).items()
                 if v is not None and k not in arg_dict}  # fmt: skip
        return cls(**arg_dict, **extra)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        scored = _call(self.model.loglikelihood, [r.args for r in requests], requests,
                       "--model_args truncation=left cuts a long prompt's start")  # fmt: skip
        return [(s.logprob, s.greedy) for s in scored]

    def loglikelihood_rolling(self, requests) -> list[float]:
        texts = [r.args[0] for r in requests]
        return [r.logprob for r in _call(self.model.loglikelihood_rolling, texts, requests, "")]

    def generate_until(self, requests) -> list[str]:
        """Requests grouped by their generation settings; each group is one batched call."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[GenOptions, list[int]] = {}
        for i, r in enumerate(requests):
            room = self.model.max_len + 1 - len(self.model.encode_context(r.args[0]))
            groups.setdefault(gen_options(r.args[1], room, self.model.max_len), []).append(i)
        for opts, idx in groups.items():
            hint = (f"max_gen_toks is {opts.max_new_tokens}: lower it (the task's "
                    "generation_kwargs or --gen_kwargs max_gen_toks=N)")  # fmt: skip
            mine = [requests[i] for i in idx]
            gens = _call(lambda x, o=opts: self.model.generate(x, o),
                         [r.args[0] for r in mine], mine, hint)  # fmt: skip
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


def _call(fn, args: list, requests, hint: str):
    """`fn(args)`, a request that does not fit the context named (lm-eval's task and doc)."""
    try:
        return fn(args)
    except TooLong as e:
        r = requests[e.index]
        where = f"task {getattr(r, 'task_name', None)}, doc {getattr(r, 'doc_id', None)}"
        msg = f"lm-eval request ({where}): {e.what}" + (f"; {hint}" if hint else "")
        raise DataError(msg) from None


def gen_options(kwargs: dict[str, Any], room: int | None = None, max_len: int = 0) -> GenOptions:
    """lm-eval's generation kwargs (`until`, `max_gen_toks`, `do_sample`, `temperature`,
    `top_k`, `top_p`) as the sampler's options; greedy unless sampling is asked for. Without
    `max_gen_toks`: 256 tokens, fewer where the prompt leaves less `room` in the context
    (`max_len // 2` where it leaves none)."""
    kw = dict(kwargs or {})
    until = kw.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(kw.pop("temperature", 0.0) or 0.0)
    if not kw.pop("do_sample", temperature > 0):
        temperature = 0.0
    stops = tuple(dict.fromkeys([*until, "</s>", END_TOKEN]))
    default = DEFAULT_MAX_GEN
    if room is not None:
        default = min(default, room if room >= 1 else max(max_len // 2, 1))
    return GenOptions(
        max_new_tokens=int(kw.pop("max_gen_toks", default)), until=stops,
        temperature=temperature, top_k=int(kw.pop("top_k", 0) or 0),
        top_p=float(kw.pop("top_p", 1.0) or 1.0), seed=int(kw.pop("seed", 0) or 0),
    )  # fmt: skip
