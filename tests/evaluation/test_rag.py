"""Retrieval-augmented tasks: BM25 finds the passage, it lands in the prompt within the
context budget (dropped passages counted), recall@k, the closed-book variant, and clear
errors for an empty store. A fake backend stands in for the model (no jax here)."""

import json
import math
import re

import numpy as np
import pytest
import yaml

from jaxllm.errors import ConfigError, DataError
from jaxllm.evaluation import retrieval
from jaxllm.evaluation.runner import Generation, Scored, TaskResult, evaluate
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


def test_terms_are_unicode_words():
    text = "Müller café, MÜLLER! Москва ΑΘΉΝΑ 서울 床前 naïve_x cafe\u0301 हिन्दी"
    assert retrieval.terms(text) == ["müller", "café", "müller", "москва", "αθήνα", "서울",
                                     "床", "前", "naïve", "x", "café", "हिन्दी"]  # fmt: skip
    rng = np.random.default_rng(0)  # ASCII text: the lower-cased [0-9a-z] runs, as before
    for _ in range(200):
        s = "".join(map(chr, rng.integers(32, 127, 40)))
        assert retrieval.terms(s) == re.findall(r"[0-9a-z]+", s.lower())


def hand_bm25(docs: list[list[str]], query: list[str], k1=1.5, b=0.75) -> list[float]:
    """Okapi BM25 with Lucene's idf, written out (each query term once)."""
    n, avgdl = len(docs), sum(map(len, docs)) / len(docs)
    df = {t: sum(t in d for d in docs) for d in docs for t in d}
    return [sum(math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5)) * d.count(t) * (k1 + 1)
                / (d.count(t) + k1 * (1 - b + b * len(d) / avgdl))
                for t in set(query) if t in df) for d in docs]  # fmt: skip


def test_bm25_in_any_script_equals_a_hand_computation():
    texts = ["Москва — столица России.", "Париж — столица Франции, Париж!",
             "Der Bär schläft im Wald.", "Die Bärin jagt Fische im Wald.",
             "The cat sat on the mat.", "Ἀθῆναι, Αθήνα: πόλη."]  # fmt: skip
    hand = [["москва", "столица", "россии"], ["париж", "столица", "франции", "париж"],
            ["der", "bär", "schläft", "im", "wald"], ["die", "bärin", "jagt", "fische", "im", "wald"],
            ["the", "cat", "sat", "on", "the", "mat"], ["ἀθῆναι", "αθήνα", "πόλη"]]  # fmt: skip
    index = retrieval.BM25Index([str(i) for i in range(len(texts))], texts)
    for q, words in [("столица Франции", ["столица", "франции"]), ("Bär", ["bär"]),
                     ("BÄRIN im Wald", ["bärin", "im", "wald"]), ("the MAT", ["the", "mat"]),
                     ("ΠΌΛΗ", ["πόλη"]), ("Wald", ["wald"])]:  # fmt: skip
        scores = hand_bm25(hand, words)
        want = sorted((i for i in range(len(texts)) if scores[i] > 0), key=lambda i: -scores[i])
        got = index.search([q], 3)[0]
        assert [round(scores[i], 9) for i in got] == [round(scores[i], 9) for i in want[:3]], q


def test_multiple_choice_reserves_room_for_the_longest_choice(tmp_path):
    """Passages are placed so that the prompt and every choice fit: the lowest-ranked passages
    go, the top one stays whole (left truncation would cut its start)."""
    retrieval.cached_index.cache_clear()
    passages = [{"id": "gold", "text": "Lighthouse keepers trimmed the lamp wicks nightly."},
                {"id": "p2", "text": "The lighthouse keeper rang a bell in fog."},
                {"id": "p3", "text": "A lighthouse guide lists the coast's towers."}]  # fmt: skip
    long = "they trimmed the wicks of the lamp and polished the lens every night " * 3
    question = {"question": "What did lighthouse keepers do?", "pid": "gold",
                "choices": [long.strip(), "they slept"], "gold": 0}  # fmt: skip
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in passages))
    (tmp_path / "q.jsonl").write_text(json.dumps(question) + "\n")
    spec = {"name": "mc", "kind": "multiple_choice", "data": "q.jsonl",
            "template": "{context}Question: {question}\nAnswer:",
            "retrieval": {"passages": "p.jsonl", "k": 3, "gold": "pid"}}  # fmt: skip
    (tmp_path / "mc.yaml").write_text(yaml.safe_dump(spec))
    ranked = {p["id"]: f"Passage: {p['text']}\n" for p in passages}

    class CharBackend(CopyBackend):  # a character a token; records the scored pairs
        def loglikelihood(self, pairs):
            self.pairs = list(pairs)
            return [Scored(-len(c), False, len(p) + len(c) > self.budget) for p, c in pairs]

    # the budget: the top two passages, the question and the longest choice, exactly
    task = load_task(str(tmp_path / "mc.yaml"))
    order = retrieval.cached_index(str(tmp_path / "p.jsonl"), "id", "text").search(
        [question["question"]], 3)[0]  # fmt: skip
    ids = [passages[j]["id"] for j in order]
    assert ids[0] == "gold" and len(ids) == 3
    two = "".join(ranked[i] for i in ids[:2]) + f"Question: {question['question']}\nAnswer:"
    backend = CharBackend(budget=len(two) + len(" " + long.strip()))
    res = evaluate(task, backend)
    assert res.passages_dropped == 1 and res.truncated == 0
    assert res.samples[0]["prompt"] == two  # the top two, whole; the third dropped
    assert all(len(p) + len(c) <= backend.budget for p, c in backend.pairs)
