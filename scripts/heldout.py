"""The held-out rule every shipped data generator shares (stdlib only).

An item (a chapter, a poem, a question with its paraphrases, an arithmetic fact) goes to val
when the first byte of the SHA-256 of its key is below VAL_SHARE of 256: deterministic, not
Python's salted hash. Arithmetic facts have one key in every generator (SFT, preference, RL
prompts), so a fact held out of one set is never trained on in another, nor is its mirror
image (a + b and b + a are one fact).
"""

from __future__ import annotations

import hashlib

VAL_SHARE = 0.1


def in_val(key: str) -> bool:
    return hashlib.sha256(key.encode()).digest()[0] < 256 * VAL_SHARE


def arith_key(a: int, op: str, b: int) -> str:
    """A sum's key has its operands in order (a + b and b + a are one fact); a difference's
    keeps them as asked."""
    return f"{min(a, b)}+{max(a, b)}" if op == "+" else f"{a}{op}{b}"
