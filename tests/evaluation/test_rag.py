"""Retrieval-augmented tasks: BM25 finds the passage, it lands in the prompt within the
context budget (dropped passages counted), recall@k, the closed-book variant, and clear
errors for an empty store. A fake backend stands in for the model (no jax here)."""

import json

import numpy as np
import pytest
import yaml

from jaxllm.errors import ConfigError, DataError
from jaxllm.evaluation import retrieval
from jaxllm.evaluation.runner import Generation, TaskResult, evaluate
from jaxllm.evaluation.tasks import load_task

PASSAGES = [
    {"id": "Genesis 1:3", "text": "Genesis 1:3 And God said, Let there be light: and there was light."},
    {"id": "John 11:35", "text": "John 11:35 Jesus wept."},
    {"id": "devil:ABATIS", "text": "ABATIS, n. Rubbish in front of a fort."},
    {"id": "tang:静夜思", "text": "《静夜思》作者：李白 床前明月光，疑是地上霜。"},
]  # fmt: skip
READS = {
    p["text"]: p["id"].split(":")[-1] if ":" in p["id"][:6] else p["id"] for p in PASSAGES
}  # what a perfect reader answers from each passage
READS[PASSAGES[3]["text"]] = "李白"
QUESTIONS = [
    {"question": 'Which verse says: "Let there be light"?', "answer": "Genesis 1:3",
     "passage_id": "Genesis 1:3", "kind": "en"},
    {"question": 'Which word is defined as "Rubbish in front of a fort"?', "answer": "ABATIS",
     "passage_id": "devil:ABATIS", "kind": "en"},
    {"question": "谁写了「床前明月光」？", "answer": "李白", "passage_id": "tang:静夜思",
     "kind": "zh"},
]  # fmt: skip


class CopyBackend:
    """Answers with the first word run of the passage in the prompt (a perfect reader); a
    prompt fits when it has at most `budget` characters."""

    def __init__(self, budget: int = 10_000):
        self.budget, self.prompts = budget, []

    def fits(self, text: str, reserve: int) -> bool:
        return len(text) + reserve <= self.budget

    def generate(self, prompts, opts):
        self.prompts += prompts
        out = []
        for p in prompts:
            line = p.split("\n")[0]
            if not line.startswith("Passage: "):
                out.append(Generation(" I do not know", False))
                continue
            ans = READS[line.removeprefix("Passage: ")]
            out.append(Generation(" " + ans, False))
        return out


def write_task(tmp_path, passages=PASSAGES, **retrieval_keys):
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n"
                                              for p in passages))  # fmt: skip
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q, ensure_ascii=False) + "\n"
                                              for q in QUESTIONS))  # fmt: skip
    spec = {"name": "rag", "kind": "generate", "data": "q.jsonl",
            "template": "{context}Question: {question}\nAnswer:", "max_new_tokens": 4,
            "group_by": "kind",
            "retrieval": {"passages": "p.jsonl", "k": 2, "gold": "passage_id",
                          **retrieval_keys}}  # fmt: skip
    (tmp_path / "rag.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True))
    return str(tmp_path / "rag.yaml")


def test_terms_split_words_and_cjk_characters():
    assert retrieval.terms("Let there be LIGHT: 床前") == [
        "let",
        "there",
        "be",
        "light",
        "床",
        "前",
    ]


def test_retrieval_puts_the_passage_in_the_prompt(tmp_path):
    retrieval.cached_index.cache_clear()
    path = write_task(tmp_path)
    res = evaluate(load_task(path), CopyBackend())
    figures = {r["metric"]: r["value"] for r in res.rows}
    assert figures["recall@1"] == 1.0 and figures["recall@2"] == 1.0
    assert figures["exact_match"] == 1.0
    assert figures["exact_match[en]"] == 1.0 and figures["recall@1[zh]"] == 1.0
    assert {r["metric"]: r["n"] for r in res.rows}["recall@2[en]"] == 2
    assert [s["retrieved"][0] for s in res.samples] == [q["passage_id"] for q in QUESTIONS]
    first = res.samples[0]["prompt"]
    assert first.startswith("Passage: Genesis 1:3") and first.endswith("Answer:")
    assert first.count("Passage: ") == len(res.samples[0]["retrieved"])  # all fit


def test_a_query_without_terms_gets_no_passage_not_the_empty_one():
    index = retrieval.BM25Index(["a", "empty", "b"], ["red apples", "?!", "blue sky"])
    assert index.search(["?!", "apples", "zebra"], 2) == [[], [0], []]


def test_retrieval_never_makes_an_example_its_own_demonstration(tmp_path):
    """The few-shot split is the data file; each record has its own `context`, which
    retrieval overwrites: the example's copy in the split must still be left out."""
    retrieval.cached_index.cache_clear()
    rows = [{**q, "context": "given\n"} for q in QUESTIONS]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q, ensure_ascii=False) + "\n"
                                              for q in rows))  # fmt: skip
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n"
                                              for p in PASSAGES))  # fmt: skip
    spec = {"name": "rag", "kind": "generate", "data": "q.jsonl", "fewshot_data": "q.jsonl",
            "num_fewshot": [2], "template": "{context}Question: {question}\nAnswer:",
            "target": "{answer}", "retrieval": {"passages": "p.jsonl", "k": 1}}  # fmt: skip
    (tmp_path / "rag.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True))
    res = evaluate(load_task(str(tmp_path / "rag.yaml")), CopyBackend())
    for sample, q in zip(res.samples, QUESTIONS):
        others = [x for x in QUESTIONS if x is not q]
        assert f"Question: {q['question']}\nAnswer: {q['answer']}" not in sample["prompt"]
        assert all(f"Question: {x['question']}\nAnswer: {x['answer']}" in sample["prompt"]
                   for x in others)  # fmt: skip
    with pytest.raises(ConfigError, match="3 demonstrations asked, but the few-shot split has 2"):
        evaluate(load_task(str(tmp_path / "rag.yaml")), CopyBackend(), num_fewshot=3)


def test_closed_book_and_the_context_budget(tmp_path):
    retrieval.cached_index.cache_clear()
    path = write_task(tmp_path)
    closed = evaluate(load_task(path + ":closed"), CopyBackend())
    figures = {r["metric"]: r["value"] for r in closed.rows}
    assert figures["exact_match"] == 0.0 and "recall@1" not in figures
    assert closed.samples[0]["prompt"].startswith("Question: ")
    tight = CopyBackend(budget=100)  # room for the short passages only
    res = evaluate(load_task(path), tight)
    kept = [p.count("Passage: ") for p in tight.prompts]
    assert res.passages_dropped == sum(len(s["retrieved"]) for s in res.samples) - sum(kept)
    assert res.passages_dropped >= 1 and sum(kept) >= 1
    assert all(len(p) + 4 <= 100 for p, n in zip(tight.prompts, kept) if n)


def test_metric_rows_per_group():
    values, groups = [1.0, 0.0, 1.0, 1.0, 0.0], ["a", "b", "a", "b", "b"]
    res = TaskResult()
    res.add(0, "em", values, groups)
    rows = {r["metric"]: r for r in res.rows}
    assert list(rows) == ["em", "em[a]", "em[b]"]
    assert rows["em"]["value"] == 0.6 and rows["em[a]"]["value"] == 1.0
    assert rows["em[b]"]["n"] == 3 and rows["em[b]"]["value"] == pytest.approx(1 / 3)
    assert rows["em[b]"]["stderr"] == pytest.approx(np.std([0, 1, 0], ddof=1) / np.sqrt(3))


def test_empty_or_missing_passage_store(tmp_path):
    retrieval.cached_index.cache_clear()
    path = write_task(tmp_path, passages=[])
    with pytest.raises(DataError, match="p.jsonl.*no|empty"):
        evaluate(load_task(path), CopyBackend())
    with pytest.raises(Exception, match="retrieval.passages"):
        load_task(_missing_store(tmp_path))


def _missing_store(tmp_path):
    path = write_task(tmp_path)
    (tmp_path / "p.jsonl").unlink()
    return path


def test_shipped_rag_task_loads():
    task = load_task("rag_qa", limit=2)
    assert task.spec.retrieval.k == 1 and task.examples[0][1]["passage_id"]
    assert load_task("rag_qa:closed").spec.retrieval.k == 0
