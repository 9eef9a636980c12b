"""Writes the shipped retrieval QA set `jaxllm/assets/rag/` (deterministic, stdlib only): a
passage store cut from the shipped corpus, questions whose answers are in it but hard to
recall closed-book, and retrieve-then-answer SFT records.

  passages.jsonl.gz {"id", "text"}: every KJV verse ("Genesis 1:3 And God said, …"), every
                   Devil's Dictionary entry ("ABATIS, n. Rubbish in front of a fort, …") and
                   every Tang poem's title, author and opening ("《静夜思》作者：李白 床前…")
  questions.jsonl  held-out questions {"question", "answer", "passage_id", "kind"}:
                   bible  Which verse says: "…"?                → "Genesis 1:3"
                   devil  Which word does the Devil's Dictionary define as "…"?  → "ABATIS"
                   tang   谁写了「…」？                          → "李白"
  train.jsonl, val.jsonl  SFT records for the other items: the gold passage in the prompt
                   ("Passage: …\\nQuestion: …"), the answer as the response — what a briefly
                   fine-tuned model learns to read from (RAG paired with fine-tuning);
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
PER_KIND = {"bible": (900, 80), "devil": (600, 80), "tang": (250, 40)}  # (train, val) caps


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
        passage = f"{title}{lines[1]} {''.join(lines[2:4])}"[:PASSAGE]
        out.append((f"tang:{title}", passage, f"谁写了「{first}」？", author))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "jaxllm" / "assets" / "rag")
    out = ap.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(23)
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
            val_sft.append({"prompt": f"Passage: {text}\nQuestion: {q}", "response": a,
                            "task": f"rag_{kind}"})  # fmt: skip
        for _, text, q, a in rng.sample(rest, min(n_train, len(rest))):
            train.append({"prompt": f"Passage: {text}\nQuestion: {q}", "response": a,
                          "task": f"rag_{kind}"})  # fmt: skip
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
        print(f"{path.relative_to(ROOT)}: {len(rows)}")


if __name__ == "__main__":
    main()
