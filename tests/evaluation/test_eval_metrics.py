"""Evaluation metrics against brute-force references, and task/prompt loading errors that
name the file, line or key."""

import itertools
import json
import math

import numpy as np
import pytest

from jaxllm.errors import ConfigError, DataError
from jaxllm.evaluation import metrics
from jaxllm.evaluation.tasks import load_task, registry
from jaxllm.evaluation.templates import build_prompt, draw_fewshot


def test_acc_and_acc_norm_follow_lm_eval():
    # choice 1 is likelier in total, choice 0 per character: acc picks 1, acc_norm picks 0
    lls, choices = [-6.0, -5.0], ["abcdefgh", "xy"]
    assert metrics.choice_accuracy(lls, choices, gold=0) == {"acc": 0.0, "acc_norm": 1.0}
    assert metrics.choice_accuracy([-1.0, -1.0], ["a", "b"], gold=0)["acc"] == 1.0  # tie: first


def test_brier_score_is_the_squared_distance_to_the_answer():
    # probabilities 1/2, 1/4, 1/4 (log-likelihoods shifted alike: only the softmax counts)
    lls = list(np.log([0.5, 0.25, 0.25]) - 7.0)
    assert metrics.brier_score(lls, gold=0) == pytest.approx(0.25 + 0.0625 + 0.0625)
    assert metrics.brier_score(lls, gold=2) == pytest.approx(0.25 + 0.0625 + 0.5625)
    assert metrics.brier_score([-3.0] * 4, gold=1) == pytest.approx(1 - 1 / 4)  # a uniform guess
    assert metrics.brier_score([0.0, -800.0], gold=0) == pytest.approx(0.0)  # no overflow


@pytest.mark.parametrize("n,c,k", [(5, 2, 1), (5, 2, 3), (6, 0, 2), (4, 4, 4), (7, 3, 5)])
def test_pass_at_k_is_the_probability_over_subsets(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    expected = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert metrics.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_mean_stderr_and_extract():
    v = [1.0, 0.0, 1.0, 1.0]
    assert metrics.mean_stderr(v) == pytest.approx(np.std(v, ddof=1) / 2)
    assert metrics.mean_stderr([1.0]) is None
    assert metrics.extract("<think>7 + 5 = 12</think> 12 apples", r"</think>\s*(-?\d+)") == "12"
    assert metrics.extract("no answer", r"(\d+)") is None
    assert metrics.extract("1 then 2", r"\d") == "2"  # the last match, no group: whole match


def test_rolling_windows_score_every_token_once():
    ids = list(range(10, 47))
    for max_len in (4, 8, 16, 64):
        wins = metrics.rolling_windows(ids, prefix=2, max_len=max_len)
        assert sum((cont for _, cont in wins), []) == ids
        for ctx, cont in wins:
            assert len(ctx) >= 1 and len(ctx) + len(cont) <= max_len + 1  # max_len read
            full = [2, *ids]
            start = full.index(cont[0])
            assert full[start - len(ctx) : start] == ctx  # the text right before it


def test_rolling_windows_and_truncation_are_lm_evals():
    """The same windows as lm-eval's own functions: each predicts up to `max_len` tokens
    from a model input of `max_len` (`(context + continuation)[:-1]`)."""
    utils = pytest.importorskip("lm_eval.utils")
    ids = list(range(10, 47))
    for max_len in (4, 8, 16, 64):
        want = [utils.make_disjoint_window(w)
                for w in utils.get_rolling_token_windows(ids, 2, max_len, 1)]  # fmt: skip
        assert metrics.rolling_windows(ids, prefix=2, max_len=max_len) == [
            (list(a), list(b)) for a, b in want
        ]


def test_perplexity_figures():
    f = metrics.perplexity_figures(-10.0, tokens=5, chars=8, nbytes=10)
    assert f["token_perplexity"] == pytest.approx(math.exp(2.0))
    assert f["bits_per_byte"] == pytest.approx(1.0 / math.log(2))


def test_perplexity_per_group_from_each_groups_sums(tmp_path):
    from jaxllm.evaluation.runner import Rolled, evaluate

    rows = [{"text": "aaaa", "g": "x"}, {"text": "bb", "g": "y"}, {"text": "c", "g": "x"}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "t.yaml").write_text(
        "name: t\nkind: perplexity\ndata: t.jsonl\ngroup_by: g\n", encoding="utf-8"
    )

    class Backend:  # one token per character; log-prob -3 per "b", -1 per other character
        def loglikelihood_rolling(self, texts):
            return [Rolled(-sum(3.0 if c == "b" else 1.0 for c in t), len(t)) for t in texts]

    res = evaluate(load_task(str(tmp_path / "t.yaml")), Backend())
    got = {r["metric"]: (r["value"], r["n"]) for r in res.rows}
    assert got["token_perplexity"] == (pytest.approx(math.exp(11 / 7)), 3)
    assert got["token_perplexity[x]"] == (pytest.approx(math.exp(1.0)), 2)
    assert got["bits_per_byte[y]"] == (pytest.approx(3.0 / math.log(2)), 1)
    assert len(got) == 12  # four figures: overall, x and y


def test_every_shipped_task_loads_and_renders():
    for name in registry():
        task = load_task(name, limit=3)
        if task.spec.kind == "perplexity" or task.spec.retrieval:  # rag: test_rag.py
            continue
        for k in task.spec.num_fewshot:
            assert build_prompt(task, 0, k).text
    cot = load_task("sums:cot", limit=2)
    assert "</think>" in build_prompt(cot, 0, 1).text and cot.spec.max_new_tokens == 48


def write_task(tmp_path, spec: dict, rows: list[dict], fewshot: list[dict] | None = None):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if fewshot is not None:
        (tmp_path / "f.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fewshot))
        spec = {"fewshot_data": "f.jsonl", **spec}
    path = tmp_path / "t.yaml"
    import yaml

    path.write_text(yaml.safe_dump({"name": "t", "data": "d.jsonl", **spec}))
    return path


def test_fewshot_layout_and_draws(tmp_path):
    rows = [{"q": f"q{i}", "a": f"a{i}"} for i in range(3)]
    pool = [{"q": f"d{i}", "a": f"b{i}"} for i in range(6)] + [rows[0]]  # a copy of example 0
    path = write_task(tmp_path, {"kind": "generate", "template": "Q: {q}", "target": "{a}",
                                 "instruction": "Answer.", "target_delimiter": " A: ",
                                 "fewshot_delimiter": "\n"}, rows, pool)  # fmt: skip
    task = load_task(str(path))
    text = build_prompt(task, 0, 2).text
    lines = text.split("\n")
    assert lines[0] == "Answer." and lines[-1] == "Q: q0" and len(lines) == 4
    assert all(line.startswith("Q: d") and " A: b" in line for line in lines[1:3])
    assert draw_fewshot(task, 0, 6) == draw_fewshot(task, 0, 6)  # seeded per example
    assert rows[0] not in [r for _, r in draw_fewshot(task, 0, 6)]  # never the example itself
    with pytest.raises(ConfigError, match=r"num_fewshot.*7 demonstrations.*has 6"):
        build_prompt(task, 0, 7)


def test_bad_task_files_name_the_place(tmp_path):
    path = write_task(tmp_path, {"kind": "generate", "template": "{question}"}, [{"q": "x"}])
    with pytest.raises(DataError, match=r"d.jsonl:1: .*names field 'question'"):
        build_prompt(load_task(str(path)), 0, 0)
    path = write_task(tmp_path, {"kind": "generate", "tempalte": "{q}"}, [{"q": "x"}])
    with pytest.raises(ConfigError, match=r"t.yaml: unknown key 'tempalte'.*did you mean"):
        load_task(str(path))
    path = write_task(tmp_path, {"kind": "multiple_choice"}, [{"question": "x", "gold": 0}])
    with pytest.raises(ConfigError, match="t.yaml: key 'num_fewshot'"):
        build_prompt(load_task(str(path)), 0, 1)
    with pytest.raises(ConfigError, match="no task 'nope'"):
        load_task("nope")
    with pytest.raises(ConfigError, match="no variant 'cot'"):
        load_task("arith_mc:cot")


class ScriptBackend:
    """Generates `script(prompt, j)` for the j-th time a prompt is asked, cut by hand at the
    first of the options' stop strings (what `EvalModel.generate` does)."""

    def __init__(self, script):
        self.script, self.seen, self.opts = script, {}, None

    def fits(self, text, reserve):
        return True

    def generate(self, prompts, opts):
        from jaxllm.evaluation.runner import Generation

        self.opts, out = opts, []
        for p in prompts:
            j = self.seen[p] = self.seen.get(p, -1) + 1
            text = self.script(p, j)
            cut = min([text.index(s) for s in opts.until if s in text], default=len(text))
            out.append(Generation(text[:cut], False))
        return out


def test_plain_generate_tasks_stop_at_the_end_token(tmp_path):
    """An SFT model ends its answer with <|end|>, in plain-text tasks too (as the bridge)."""
    from jaxllm.evaluation.runner import evaluate

    rows = [{"q": "2+2", "answer": "4"}, {"q": "3+3", "answer": "6"}]
    path = write_task(tmp_path, {"kind": "generate", "template": "{q}"}, rows)
    raw = {"2+2": "4<|end|>\nmore", "3+3": "6<|end|><|user|>7"}
    backend = ScriptBackend(lambda p, j: raw[p])
    res = evaluate(load_task(str(path)), backend)
    assert "<|end|>" in backend.opts.until and "\n" in backend.opts.until
    assert [s["completions"] for s in res.samples] == [["4"], ["6"]]
    assert {r["metric"]: r["value"] for r in res.rows}["exact_match"] == 1.0


def test_match_rate_with_samples_is_clustered_by_example(tmp_path):
    """samples > 1: each example's share of right samples is one value; stderr over examples."""
    from jaxllm.evaluation.runner import evaluate

    right = [0, 1, 2, 4, 3]  # right samples (of 4) per example
    rows = [{"q": f"q{i}", "answer": "a", "g": "x" if i < 2 else "y"} for i in range(5)]
    spec = {"kind": "generate", "template": "{q}", "temperature": 1.0, "samples": 4,
            "pass_at": [1], "group_by": "g"}  # fmt: skip
    path = write_task(tmp_path, spec, rows)
    backend = ScriptBackend(lambda p, j: "a" if j < right[int(p[1:])] else "b")
    res = evaluate(load_task(str(path)), backend)
    rows_ = {r["metric"]: r for r in res.rows}
    share = np.array(right) / 4
    em = rows_["exact_match"]
    assert em["n"] == 5 and em["value"] == pytest.approx(share.mean())
    assert em["stderr"] == pytest.approx(np.std(share, ddof=1) / math.sqrt(5))
    assert rows_["exact_match[y]"]["n"] == 3
    assert rows_["exact_match[y]"]["stderr"] == pytest.approx(
        np.std(share[2:], ddof=1) / math.sqrt(3)
    )
    assert rows_["pass@1"]["stderr"] == pytest.approx(em["stderr"])  # pass@1 = the same shares


def test_reference_answers_are_any_json_scalar(tmp_path):
    from jaxllm.evaluation.runner import evaluate

    rows = [{"q": "a", "answer": 0.5}, {"q": "b", "answer": [2.50, "two and a half"]},
            {"q": "c", "answer": True}, {"q": "d", "answer": 7}]  # fmt: skip
    path = write_task(tmp_path, {"kind": "generate", "template": "{q}"}, rows)
    said = {"a": "0.5", "b": "2.5", "c": "true", "d": "7"}
    res = evaluate(load_task(str(path)), ScriptBackend(lambda p, j: said[p]))
    assert [s["references"] for s in res.samples] == [
        ["0.5"],
        ["2.5", "two and a half"],
        ["true"],
        ["7"],
    ]
    assert {r["metric"]: r["value"] for r in res.rows}["exact_match"] == 1.0
    for bad in (None, {"x": 1}, [], ["a", None]):
        path = write_task(tmp_path, {"kind": "generate", "template": "{q}"},
                          [{"q": "a", "answer": bad}])  # fmt: skip
        with pytest.raises(DataError, match=r"d.jsonl:1: field 'answer' must be a string, a "
                                            r"number or a non-empty list of them, got"):  # fmt: skip
            evaluate(load_task(str(path)), ScriptBackend(lambda p, j: "a"))
