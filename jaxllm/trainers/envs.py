"""Environments for multi-turn RL episodes (`grpo.env`), and the calculator tool.

An environment answers the model between its turns. Protocol: `reset(record)` starts an
episode for a prompt row and returns a first observation (text appended after the prompt;
"" for none); `step(action_text)` takes the text of one model turn and returns
`(observation, reward, done)`. A model turn ends at the environment's `stop` string (a tool
call: the observation is appended as environment tokens and the model continues) or at the
model's end-of-turn token (its final answer: the episode ends). `episodes.py` runs the turns.

The calculator: the model writes `<tool>17+25</tool>`, the environment answers
`<result>42</result>`. Expressions are integers with + - * and parentheses, checked
character by character and then node by node on Python's `ast` tree, and computed by
walking that tree; nothing is ever `eval`-ed. A bad expression is answered
`<result>error: ...</result>` with reward 0. The calculator's steps give reward 0 all the
time: the answer's correctness is the rule `arithmetic` (`grpo.rewards`) on the episode's
text, whose final answer is the text after the last `</result>` (`rewards.final_answer`).
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from typing import Any, Protocol

from jaxllm.errors import ConfigError
from jaxllm.tokenizer.chat import END_RESULT, END_TOOL, RESULT, TOOL


class Env(Protocol):
    """One episode's environment (a fresh one per episode)."""

    stop: str  # a model turn that contains it is cut right after it and handed over

    def reset(self, record: dict[str, Any]) -> str: ...

    def step(self, action_text: str) -> tuple[str, float, bool]: ...


class CalculatorError(ValueError):
    """An expression the calculator does not compute (the message says why)."""


MAX_EXPR_CHARS = 64  # bounds the parse (nesting depth) before `ast` sees the text
MAX_DIGITS = 30  # bounds the value: 64 characters of products could reach 10^60
_CHARS = set("0123456789+-*() ")
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculate(expr: str) -> int:
    """The value of an integer expression with + - * and parentheses; `CalculatorError`
    for anything else (names, calls, division, powers, floats, too long or too large)."""
    if not expr.strip():
        raise CalculatorError("empty expression")
    if len(expr) > MAX_EXPR_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPR_CHARS} characters")
    bad = next((c for c in expr if c not in _CHARS), None)
    if bad is not None:
        raise CalculatorError(f"unsupported character {bad!r} (integers, + - * and ())")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        raise CalculatorError(f"malformed expression {expr.strip()!r}") from None
    return _value(tree.body)


def _value(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        out = node.value
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        out = _BINARY[type(node.op)](_value(node.left), _value(node.right))
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        out = _UNARY[type(node.op)](_value(node.operand))
    else:
        what = type(getattr(node, "op", node)).__name__
        raise CalculatorError(f"unsupported operation {what} (integers, + - * and ())")
    if len(str(abs(out))) > MAX_DIGITS:
        raise CalculatorError(f"result longer than {MAX_DIGITS} digits")
    return out


def tool_expression(text: str) -> str | None:
    """The expression of the tool call that ends `text` (`...<tool>EXPR</tool>`), else None."""
    body = text.rstrip()
    if not body.endswith(END_TOOL):
        return None
    head, sep, expr = body[: -len(END_TOOL)].rpartition(TOOL)
    return expr if sep else None


class CalculatorEnv:
    """The calculator tool: a turn ending in `<tool>EXPR</tool>` gets `<result>value</result>`
    (or `<result>error: why</result>`); a turn without a call is the final answer (done)."""

    stop = END_TOOL

    def reset(self, record: dict[str, Any]) -> str:
        return ""

    def step(self, action_text: str) -> tuple[str, float, bool]:
        expr = tool_expression(action_text)
        if expr is None:
            return "", 0.0, True
        try:
            value = str(calculate(expr))
        except CalculatorError as e:
            value = f"error: {e}"
        return f"{RESULT}{value}{END_RESULT}", 0.0, False


ENVS: dict[str, Callable[[], Env]] = {"calculator": CalculatorEnv}


def get_env(name: str, key: str = "grpo.env") -> Callable[[], Env]:
    """The environment factory called `name`, or a ConfigError naming the key and choices."""
    if name not in ENVS:
        raise ConfigError(
            f"config key '{key}': unknown environment '{name}' (environments: {', '.join(ENVS)})"
        )
    return ENVS[name]
