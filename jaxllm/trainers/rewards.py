"""Named rule rewards for RL on verifiable answers: `reward(response_text, record) -> float`.

`record` is a prompt row (`answer` = the reference string). A registry by name lets configs
pick and weight them (`grpo.rewards`, `ppo.reward`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from jaxllm.errors import ConfigError

Reward = Callable[[str, dict[str, Any]], float]

_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*\S", re.DOTALL)


def final_answer(text: str) -> str:
    """The answer part of a response: the text after the last `</think>`, else all of it."""
    head, sep, tail = text.rpartition("</think>")
    return (tail if sep else text).strip()


def arithmetic(text: str, record: dict[str, Any]) -> float:
    """1 when the final answer equals the record's `answer` (whitespace-trimmed), else 0."""
    ref = record.get("answer")
    if ref is None:
        return 0.0
    return float(final_answer(text) == str(ref).strip())


def format_reward(text: str, record: dict[str, Any]) -> float:
    """1 for `<think>…</think>` followed by a non-empty answer, else 0."""
    return float(bool(_FORMAT.match(text)))


def digits(text: str, record: dict[str, Any]) -> float:
    """Partial credit for a numeric answer: the share of the reference's digits matched
    position by position from the right (units first); 0 for a non-number or a wrong length.
    A dense shaping signal for models that rarely get the whole answer right."""
    ans, ref = final_answer(text), str(record.get("answer") or "").strip()
    if not (ans.isdigit() and ref.isdigit()) or len(ans) != len(ref):
        return 0.0
    return sum(a == b for a, b in zip(ans[::-1], ref[::-1])) / len(ref)


REWARDS: dict[str, Reward] = {"arithmetic": arithmetic, "format": format_reward, "digits": digits}


def get_reward(name: str, key: str = "grpo.rewards") -> Reward:
    """The rule reward called `name`, or a ConfigError naming the config key and the choices."""
    if name not in REWARDS:
        raise ConfigError(
            f"config key '{key}': unknown reward '{name}' (rule rewards: {', '.join(REWARDS)})"
        )
    return REWARDS[name]


def weighted_reward(
    names: Sequence[str], weights: Sequence[float], key: str = "grpo.rewards"
) -> Reward:
    """sum_i w_i * reward_i(text, record) over the named rules."""
    fns = [get_reward(n, key) for n in names]

    def reward(text: str, record: dict[str, Any]) -> float:
        return float(sum(w * f(text, record) for w, f in zip(weights, fns, strict=True)))

    return reward
