"""Writes the shipped retrieval QA set `jaxllm/assets/rag/` (deterministic, stdlib only): a
passage store cut from the shipped corpus, questions whose answers are in it but hard to
recall closed-book, and retrieve-then-answer SFT records.

  passages.jsonl.gz {"id", "text"}: every KJV verse ("Genesis 1:3 And God said, …"), every
                   Devil's Dictionary entry ("ABATIS, n. Rubbish in front of a fort, …") and
                   every Tang poem's author, title and opening ("作者：李白 《静夜思》 床前…")
  questions.jsonl  held-out questions {"question", "answer", "passage_id", "kind"}:
                   bible  Which verse says: "…"?                → "Genesis 1:3"
                   devil  Which word does the Devil's Dictionary define as "…"?  → "ABATIS"
                   tang   谁写了「…」？                          → "李白"
  train.jsonl, val.jsonl  SFT records for the other items: the gold passage in the prompt
                   ("Passage: …\\nQuestion: …"), the response the answer as it stands in the
                   passage with the label before it ("Passage: ABATIS", "作者：李白",
                   `reading`) — what a briefly fine-tuned model learns to copy (RAG paired
                   with fine-tuning); 2,576 records (a capped sample of 1,750 plus `EXTRA`),
                   each also as a counterfactual: the same passage naming another answer
                   of its kind, the response that answer (a prior cannot fit those; only
                   reading can) — 5,152 in all;
                   val: the held-out questions with their gold passage
Held out by item (a verse, an entry, a poem) with the `heldout.py` rule.

    python scripts/make_rag_data.py [--out jaxllm/assets/rag]
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
from pathlib import Path

from heldout import in_val

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "jaxllm" / "assets" / "corpus"
QUOTE = 60  # characters of a verse or definition quoted in a question
PASSAGE = 180  # characters of a passage kept
SHOWN = 64  # characters of a passage in an SFT prompt (the eval tasks' `passage_chars`)
PER_KIND = {"bible": (900, 80), "devil": (600, 80), "tang": (250, 40)}  # (train, val) caps
# More training items per kind, drawn after the capped sample with a second generator so the
# held-out questions and the first 1,750 training items stay as they were: every Devil's Dictionary
# entry and Tang poem not held out, so memorising answers pays less than copying them.
EXTRA = {"bible": 600, "devil": 10_000, "tang": 10_000}


def docs(name: str) -> list[str]:
    with gzip.open(CORPUS / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(x)["text"].removeprefix("<s>").removesuffix("</s>") for x in f]


def quote(text: str) -> str:
    """The first QUOTE characters, cut at a word (whole text when short)."""
    if len(text) <= QUOTE:
        return text.rstrip(".,;:")
    return text[:QUOTE].rsplit(" ", 1)[0].rstrip(".,;:")


def bible() -> list[tuple[str, str, str, str]]:
    """(id, passage, question, answer) per verse."""
    out = []
    for chapter in docs("kjv"):
        head, *verses = chapter.split("\n")
        for line in verses:
            n, _, text = line.partition(" ")
            ref = f"{head}:{n}"
            q = f'Which verse says: "{quote(text)}"?'
            out.append((ref, f"{ref} {text}"[:PASSAGE], q, ref))
    return out


def devil() -> list[tuple[str, str, str, str]]:
    out = []
    for entry in docs("devil"):
        m = re.match(r"([A-Z][A-Z' -]+), (\w+\.(?: \w+\.)?) (.+)", entry, re.S)
        if not m or len(m.group(3)) < 20:
            continue
        word, definition = m.group(1), " ".join(m.group(3).split())
        q = f'Which word does the Devil\'s Dictionary define as "{quote(definition)}"?'
        out.append((f"devil:{word}", " ".join(entry.split())[:PASSAGE], q, word))
    return out


def tang() -> list[tuple[str, str, str, str]]:
    out = []
    for poem in docs("tang300"):
        lines = poem.split("\n")
        if len(lines) < 3 or not lines[1].startswith("作者："):
            continue
        title, author, first = lines[0], lines[1].removeprefix("作者："), lines[2]
        passage = f"{lines[1]} {title} {''.join(lines[2:4])}"[:PASSAGE]  # author first
        out.append((f"tang:{title}", passage, f"谁写了「{first}」？", author))
    return out


CUES = ("Passage: ", "作者：")  # what stands right before an answer in a prompt's passage


def reading(answer: str, passage: str) -> str:
    """The response: the answer as it stands in the prompt "Passage: {passage}", with the
    label right before it ("Passage: ABATIS", "Passage: Genesis 1:3", "作者：李白").
    Repeating the label makes reading a copy an induction head can do — the label is in the
    context followed by the answer's first token, each next token follows the one before —
    and its pieces are the passage's own (the tokenizer has no dummy prefix: "ABATIS" and
    " ABATIS" start with different pieces). The eval tasks' `extract` drops the label."""
    text = "Passage: " + passage
    at = text.find(answer)
    cue = next((c for c in CUES if text[:at].endswith(c)), None)
    if at < 0 or cue is None:
        raise ValueError(f"{answer!r} does not follow a label in {passage!r}")
    return text[at - len(cue) : at + len(answer)]


def record(kind: str, passage: str, question: str, answer: str) -> dict[str, str]:
    """A retrieve-then-answer SFT record: the passage's opening, the question, the reading."""
    return {"prompt": f"Passage: {passage[:SHOWN]}\nQuestion: {question}",
            "response": reading(answer, passage), "task": f"rag_{kind}"}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "jaxllm" / "assets" / "rag")
    out = ap.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    rng, extra, swap = random.Random(23), random.Random(2323), random.Random(2324)
    passages, questions, train, val_sft = [], [], [], []
    for kind, items in (("bible", bible()), ("devil", devil()), ("tang", tang())):
        seen = set()
        items = [it for it in items if not (it[0] in seen or seen.add(it[0]))]
        passages += [{"id": pid, "text": text} for pid, text, _, _ in items]
        ask = [it for it in items if len({x[2] for x in items if x[2] == it[2]}) == 1]
        val = [it for it in ask if in_val(it[0])]
        rest = [it for it in ask if not in_val(it[0])]
        n_train, n_val = PER_KIND[kind]
        for pid, text, q, a in rng.sample(val, min(n_val, len(val))):
            questions.append({"question": q, "answer": a, "passage_id": pid, "kind": kind})
            val_sft.append(record(kind, text, q, a))
        picked = rng.sample(rest, min(n_train, len(rest)))
        taken = {it[0] for it in picked}
        left = [it for it in rest if it[0] not in taken]
        picked += extra.sample(left, min(EXTRA[kind], len(left)))
        train += [record(kind, text, q, a) for _, text, q, a in picked]
        answers = sorted({a for *_, a in picked})
        for _, text, q, a in picked:  # the same passage naming another answer (counterfactual)
            b = swap.choice([x for x in answers if x != a])
            train.append(record(kind, text.replace(a, b, 1), q, b))
    rng.shuffle(train)
    for name, rows in (
        ("passages", passages),
        ("questions", questions),
        ("train", train),
        ("val", val_sft),
    ):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        path = out / f"{name}.jsonl{'.gz' if name == 'passages' else ''}"
        if name == "passages":  # mtime 0: the same bytes on every run
            path.write_bytes(gzip.compress(text, mtime=0))
        else:
            path.write_bytes(text)
        print(f"{path}: {len(rows)}")


if __name__ == "__main__":
    main()
