"""`stage: eval` on a tiny checkpoint: log-likelihoods equal a hand computation (one unpadded
forward pass, numpy log-softmax), accuracy follows from them, generation equals the sampler's
greedy output, prompts too long are cut (counted) or refused (named)."""

import functools
import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from jaxllm.config import from_dict
from jaxllm.errors import DataError
from jaxllm.evaluation.runner import GenOptions, TaskResult
from jaxllm.rundir import RunDir
from jaxllm.trainers import eval as eval_stage
from jaxllm.trainers.eval_model import EvalModel


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return EvalModel.load(tiny_ckpt, batch_size=4)


@functools.cache
def _forward(model: EvalModel):
    return jax.jit(lambda state, row: nnx.merge(model.graphdef, state)(row))


def hand_logprobs(model: EvalModel, ids: list[int]) -> np.ndarray:
    """log p(ids[t] | ids[:t]) for t >= 1, from one forward pass of the row, right-padded to the
    model's length (causal: the padding cannot reach the positions read; one compilation)."""
    row = np.zeros((1, model.max_len), np.int32)
    row[0, : len(ids)] = ids
    out = _forward(model)(model.state, jnp.asarray(row))
    logits = np.asarray(out, np.float64)[0, : len(ids)]
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return np.array([logp[t - 1, ids[t]] for t in range(1, len(ids))])


def test_loglikelihood_equals_a_hand_computation(model):
    pairs = [("What is 2 + 3?", " 5"), ("What is 2 + 3?", " 6"),
             ("Continue this verse: In the beginning", " God created the heaven"),
             ("下一句是什么？", "床前明月光"), ("x", " y z w")]  # fmt: skip
    got = model.loglikelihood(pairs)
    for (ctx, cont), s in zip(pairs, got):
        ctx_ids, cont_ids = model.encode_pair(ctx, cont)
        assert ctx_ids[0] == model.tok.bos_id and cont_ids
        ref = hand_logprobs(model, ctx_ids + cont_ids)[len(ctx_ids) - 1 :].sum()
        assert s.logprob == pytest.approx(ref, abs=2e-4) and not s.truncated
    rolled = model.loglikelihood_rolling(["What is 2 + 3? 5"])[0]
    ids = model.encode_context("What is 2 + 3? 5")
    assert rolled.tokens == len(ids) - 1
    assert rolled.logprob == pytest.approx(hand_logprobs(model, ids).sum(), abs=2e-4)


def test_rolling_past_the_context_scores_each_token_once(model):
    text = "And God said, Let there be light: and there was light. " * 20
    ids = model.tok.encode(text)
    assert len(ids) > model.max_len
    r = model.loglikelihood_rolling([text])[0]
    assert r.tokens == len(ids) and np.isfinite(r.logprob)


def test_long_prompts_are_cut_from_the_left_or_refused(model):
    long_ctx = "word " * 400
    s = model.loglikelihood([(long_ctx, " end")])[0]
    assert s.truncated
    strict = EvalModel(model.graphdef, model.state, model.tok, max_len=model.max_len,
                       truncation="error")  # fmt: skip
    from jaxllm.evaluation.runner import TooLong

    with pytest.raises(TooLong, match="more than the"):
        strict.loglikelihood([(long_ctx, " end")])
    g = model.generate([long_ctx], GenOptions(max_new_tokens=4))[0]
    assert g.truncated


def test_greedy_generation_is_deterministic_and_cut_at_stops(model):
    opts = GenOptions(max_new_tokens=8, until=("\n", "</s>"))
    a = model.generate(["What is 2 + 3?", "In the beginning"], opts)
    b = model.generate(["In the beginning"], opts)
    assert a[1].text == b[0].text and "\n" not in a[0].text


def write_tasks(tmp_path):
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1),
             "choices": [str(i + 1), str(i + 2)], "gold": 0} for i in range(5)]  # fmt: skip
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "p.jsonl").write_text('{"text": "In the beginning God created."}\n')
    specs = {
        "mc": {"kind": "multiple_choice", "fewshot_data": "d.jsonl", "num_fewshot": [0, 2]},
        "gen": {"kind": "generate", "max_new_tokens": 3, "temperature": 1.0, "samples": 2,
                "pass_at": [1, 2]},
        "ppl": {"kind": "perplexity", "data": "p.jsonl"},
    }  # fmt: skip
    for name, spec in specs.items():
        (tmp_path / f"{name}.yaml").write_text(
            yaml.safe_dump({"name": name, "data": "d.jsonl", **spec})
        )
    return [str(tmp_path / f"{n}.yaml") for n in specs]


def test_eval_stage_writes_tables_and_samples(tmp_path, tiny_ckpt, model):
    tasks = write_tasks(tmp_path)
    cfg = from_dict({
        "stage": "eval", "output_dir": str(tmp_path / "run"), "progress": False,
        "eval": {"tasks": tasks, "models": [{"name": "tiny", "checkpoint": str(tiny_ckpt)}],
                 "batch_size": 4, "samples": -1},
    })  # fmt: skip
    run_dir = RunDir.open(cfg)
    summary = run_dir.finish(eval_stage.run(cfg, run_dir))
    rows = summary["tasks"]["mc"]["rows"]
    assert {(r["num_fewshot"], r["metric"]) for r in rows} == {
        (k, m) for k in (0, 2) for m in ("acc", "acc_norm", "brier_score")
    }
    samples = [json.loads(x) for x in (tmp_path / "run/samples/tiny/mc.jsonl").open()]
    zero = [s for s in samples if s["num_fewshot"] == 0]
    for s in zero:  # acc from the hand-computed log-likelihoods of the two choices
        lls = [model.loglikelihood([(s["prompt"], " " + c)])[0].logprob for c in s["choices"]]
        assert s["logprobs"] == pytest.approx(lls, abs=2e-4)
        assert s["acc"] == float(int(np.argmax(lls)) == s["gold"])
        p = np.exp(lls) / np.sum(np.exp(lls))  # the two choices' probabilities
        assert s["brier_score"] == pytest.approx(2 * (1 - p[s["gold"]]) ** 2, abs=1e-3)
    acc0 = next(r for r in rows if r["num_fewshot"] == 0 and r["metric"] == "acc")
    assert acc0["value"] == pytest.approx(np.mean([s["acc"] for s in zero]))
    gen = {r["metric"] for r in summary["tasks"]["gen"]["rows"]}
    assert gen == {"exact_match", "pass@1", "pass@2"}
    ppl = {r["metric"]: r["value"] for r in summary["tasks"]["ppl"]["rows"]}
    assert ppl["token_perplexity"] > 1
    assert (tmp_path / "run/results.md").read_text().count("###") == 3
    assert (tmp_path / "run/fewshot.png").is_file()
    assert set(summary["task_seconds"]) == {"tiny/mc", "tiny/gen", "tiny/ppl"}
    assert summary["seconds"] >= sum(summary["task_seconds"].values())


def test_only_tasks_at_several_k_are_plotted():
    def task(name):
        return SimpleNamespace(name=name)

    one_k = TaskResult()
    one_k.add(0, "exact_match", [1.0, 0.0])
    one_k.add(None, "recall@1", [1.0, 1.0])  # retrieval rows have no k
    two_k = TaskResult()
    for k in (0, 4):
        two_k.add(k, "acc", [1.0])
    tasks = [task("rag"), task("icl")]
    results = {"rag": {"m": one_k}, "icl": {"m": two_k}}
    assert [t.name for t in eval_stage.fewshot_tasks(tasks, results)] == ["icl"]


def test_a_record_too_long_is_named_with_truncation_error(tmp_path, tiny_ckpt):
    (tmp_path / "d.jsonl").write_text(json.dumps({"question": "w " * 400, "answer": "1"}) + "\n")
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"name": "t", "kind": "generate",
                                                     "data": "d.jsonl"}))  # fmt: skip
    cfg = from_dict({
        "stage": "eval", "output_dir": str(tmp_path / "run"), "progress": False,
        "inputs": {"checkpoint": str(tiny_ckpt)},
        "eval": {"tasks": [str(tmp_path / "t.yaml")], "truncation": "error"},
    })  # fmt: skip
    with pytest.raises(DataError, match=r"d.jsonl:1: the prompt has \d+ tokens"):
        eval_stage.run(cfg, RunDir.open(cfg))
