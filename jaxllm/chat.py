"""`python -m jaxllm.chat --checkpoint DIR [--set chat.temperature=0 ...]`: talk to a
checkpoint with the chat template (`stage: chat`, configs/chat.yaml's settings, without a
config file; the transcript goes to runs/chat/chat.jsonl). No system prompt unless
`--set chat.system=TEXT` gives one or `--set chat.prompt=NAME` names a library prompt
(jaxllm/assets/prompts/, e.g. `assistant`): the shipped SFT data has no system turn, so a
model fine-tuned on it answers best without one."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import yaml

from jaxllm.main import main as run_main

DEFAULTS = {"stage": "chat", "output_dir": "runs/chat", "overwrite": True, "progress": False,
            "mesh": {"data": -1}}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxllm.chat", description=__doc__)
    ap.add_argument("--checkpoint", required=True, help="a checkpoints/ directory")
    ap.add_argument("--set", action="append", default=[], help="key=value (chat.*, mesh.*)")
    args = ap.parse_args(argv)
    raw = {**DEFAULTS, "inputs": {"checkpoint": args.checkpoint}}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "chat.yaml"
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        return run_main(["--config", str(path), *(x for s in args.set for x in ("--set", s))])


if __name__ == "__main__":
    sys.exit(main())
