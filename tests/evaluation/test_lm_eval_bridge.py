"""The lm-evaluation-harness bridge, offline: lm-eval runs the shipped local tasks
(jaxllm/assets/lm_eval, local JSONL) on a tiny checkpoint through `--model jaxllm`, and its
numbers equal `stage: eval`'s on the same task and prompts."""

from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from jaxllm.evaluation.runner import evaluate  # noqa: E402
from jaxllm.evaluation.tasks import load_task  # noqa: E402
from jaxllm.trainers.lm_eval_bridge import JaxLLM, gen_options  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
N = 6


@pytest.fixture(scope="module")
def bridge(tiny_ckpt):
    return JaxLLM(checkpoint=str(tiny_ckpt), batch_size=8)


def lm_eval_run(lm, task: str, monkeypatch) -> dict:
    monkeypatch.chdir(ROOT)  # the task files name their data relative to the repository
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tm = TaskManager(include_path=str(ROOT / "jaxllm/assets/lm_eval"))
    return simple_evaluate(model=lm, tasks=[task], num_fewshot=0, limit=N, task_manager=tm,
                           log_samples=True, bootstrap_iters=0)  # fmt: skip


def test_multiple_choice_equals_the_eval_stage(bridge, monkeypatch):
    out = lm_eval_run(bridge, "jaxllm_arith_mc", monkeypatch)
    ours = evaluate(load_task("arith_mc", limit=N), bridge.model, num_fewshot=0)
    figures = {r["metric"]: r["value"] for r in ours.rows}
    res = out["results"]["jaxllm_arith_mc"]
    assert res["acc,none"] == pytest.approx(figures["acc"])
    assert res["acc_norm,none"] == pytest.approx(figures["acc_norm"])
    assert res["brier_score,none"] == pytest.approx(figures["brier_score"])
    theirs = sorted(out["samples"]["jaxllm_arith_mc"], key=lambda s: s["doc_id"])
    for s, mine in zip(theirs, ours.samples):
        assert [r[0][0] for r in s["resps"]] == pytest.approx(mine["logprobs"], abs=1e-6)
        assert s["arguments"][0][0] == mine["prompt"]


@pytest.mark.slow
def test_generate_until_equals_the_eval_stage(bridge, monkeypatch):
    out = lm_eval_run(bridge, "jaxllm_arith_gen", monkeypatch)
    ours = evaluate(load_task("arith_gen", limit=N), bridge.model, num_fewshot=0)
    theirs = sorted(out["samples"]["jaxllm_arith_gen"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in theirs] == [m["completions"][0] for m in ours.samples]
    em = next(r["value"] for r in ours.rows if r["metric"] == "exact_match")
    assert out["results"]["jaxllm_arith_gen"]["exact_match,strip"] == pytest.approx(em)


def test_rolling_loglikelihood_and_options(bridge):
    class Req:
        def __init__(self, *args):
            self.args = args

    text = "In the beginning God created the heaven and the earth."
    (ll,) = bridge.loglikelihood_rolling([Req(text)])
    assert ll == pytest.approx(bridge.model.loglikelihood_rolling([text])[0].logprob)
    opts = gen_options({"until": "\n\n", "max_gen_toks": 5, "do_sample": False,
                        "temperature": 0.7})  # fmt: skip
    assert opts.temperature == 0.0 and opts.max_new_tokens == 5 and "\n\n" in opts.until
    assert gen_options({"temperature": 0.7}).temperature == 0.7  # do_sample unset: sampled
    assert gen_options({}).temperature == 0.0
    chat = bridge.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == "<s><|user|>hi<|end|><|assistant|>"


class Req:
    def __init__(self, *args, task_name="t", doc_id=0):
        self.args, self.task_name, self.doc_id = args, task_name, doc_id


def test_model_args_batch_size_wins_over_lm_evals_flag(monkeypatch):
    """lm-eval passes its own `batch_size` (default 1) next to `--model_args`."""
    from types import SimpleNamespace

    from lm_eval.api.registry import get_model

    monkeypatch.setattr("jaxllm.trainers.lm_eval_bridge.EvalModel.load",
                        lambda checkpoint, **kw: SimpleNamespace(**kw))  # fmt: skip
    cls, cli = get_model("jaxllm"), {"batch_size": 1, "max_batch_size": None, "device": None}
    assert cls.create_from_arg_string("checkpoint=c,batch_size=32", cli).model.batch_size == 32
    assert (
        cls.create_from_arg_string("checkpoint=c", {**cli, "batch_size": 8}).model.batch_size == 8
    )
    assert cls.create_from_arg_obj({"checkpoint": "c", "batch_size": 4}, cli).model.batch_size == 4


def test_default_max_gen_toks_fits_the_context(bridge, monkeypatch):
    """Without `max_gen_toks`: 256 new tokens, or the room the prompt leaves (half the
    context for a prompt that fills it); a `max_gen_toks` too large is named."""
    from jaxllm.errors import DataError
    from jaxllm.evaluation.runner import Generation

    m = bridge.model
    short, long = "What is 2 + 2?", "word " * (2 * m.max_len)
    asked = []

    def generate(prompts, opts):
        asked.extend((p, opts.max_new_tokens) for p in prompts)
        return [Generation("4", False) for _ in prompts]

    monkeypatch.setattr(m, "generate", generate)
    assert bridge.generate_until([Req(short, {"until": ["\n"]}), Req(long, {})]) == ["4", "4"]
    n_short = len(m.tok.encode(short)) + 1  # with BOS
    assert dict(asked) == {short: min(256, m.max_len - n_short + 1), long: m.max_len // 2}
    monkeypatch.undo()
    with pytest.raises(DataError, match=r"task t, doc 0.*max_gen_toks is \d+: lower it"):
        bridge.generate_until([Req(short, {"max_gen_toks": m.max_len + 1})])
