"""Chat-template rendering: one sentencepiece call per text (what `Tokenizer` does for fewer
than 64 texts) against one threaded list call per text (what it did before), in the same run.

Renders every record of the shipped SFT set (`jaxllm/assets/sft/train.jsonl`, one user and
one assistant turn each) with `ChatTemplate.render`, both ways, best of `--repeats` passes,
and checks that the ids are the same. The tokenizer is a 1,300-piece BPE with the chat tokens
trained here on those texts (about a second), or `--tokenizer PATH`.

    .venv/bin/python bench/chat_render.py
    .venv/bin/python bench/chat_render.py --tokenizer runs/tiny/2-tiny_tokenizer/tokenizer.model
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SFT = ROOT / "jaxllm/assets/sft/train.jsonl"


def best_of(repeats: int, fn) -> tuple[float, list]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    from jaxllm.config import TokenizerConfig
    from jaxllm.tokenizer import Tokenizer, train_tokenizer
    from jaxllm.tokenizer import tokenizer as tok_mod
    from jaxllm.tokenizer.chat import ChatTemplate

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", default="", help="a sentencepiece model with the chat tokens")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = [json.loads(x) for x in SFT.read_text(encoding="utf-8").splitlines()]
    chats = [
        [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
        for r in rows
    ]
    path = args.tokenizer
    if not path:
        texts = [f"<s>{r['prompt']}\n{r['response']}</s>" for r in rows[:2000]]
        cfg = TokenizerConfig(vocab_size=1300, character_coverage=0.98)
        path = train_tokenizer(texts, cfg, Path(tempfile.mkdtemp()) / "tokenizer")
    template = ChatTemplate(Tokenizer.load(path))

    def render_all() -> list:
        return [template.render(c).ids for c in chats]

    def threaded(fn, items, num_threads):  # the list call for every batch, as before
        return fn(items, num_threads=num_threads) if items else []

    render_all()  # warm-up
    each_s, each = best_of(args.repeats, render_all)
    one_by_one = tok_mod._each_or_threaded
    tok_mod._each_or_threaded = threaded
    try:
        list_s, listed = best_of(args.repeats, render_all)
    finally:
        tok_mod._each_or_threaded = one_by_one
    print(f"{len(chats)} chats, best of {args.repeats}")
    print(f"  one call per text:        {each_s:.3f} s")
    print(f"  one threaded list call:   {list_s:.3f} s")
    print(f"ratio (list / one per text): {list_s / each_s:.2f}x; same ids: {each == listed}")


if __name__ == "__main__":
    main()
