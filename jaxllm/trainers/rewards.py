"""Named rule rewards for RL on verifiable answers: `reward(response_text, record) -> float`.

`record` is a prompt row (`answer` = the reference string). A registry by name lets configs
pick and weight them (`grpo.rewards`, `ppo.reward`, `ppo.eval_rules`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from jaxllm.errors import ConfigError
from jaxllm.tokenizer.chat import END_RESULT, END_THINK, END_TOOL, TOOL

Reward = Callable[[str, dict[str, Any]], float]

_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*\S", re.DOTALL)
_TOOL_CALL = re.compile(re.escape(TOOL) + ".*?" + re.escape(END_TOOL), re.DOTALL)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_PUNCT = re.compile(r"[^\w\s]")
_DIGITS = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() also takes '²', '٢', '４'

# The fixed sentences of the shipped preference set's answer templates
# (scripts/make_preference_data.py: POLITE, and EVASIVE + RUDE), as `template_phrases` gives
# them; tests/rl/test_rewards.py checks they still match the generator.
POLITE_PHRASES = (
    "happy to help", "thanks for asking", "of course", "anything else i can do",
    "good question", "sure, here is how", "hope that helps",
)  # fmt: skip
IMPOLITE_PHRASES = (
    "i'm not sure, maybe check later", "hard to say", "try again some other time",
    "i don't really know about that", "it depends, i guess", "maybe ask again later",
    "not sure", "it might work, it might not", "could be",
    "i can't say for certain right now", "figure it out yourself", "not my problem",
    "stop asking me that", "read the website, it's not hard", "why would i know",
    "go away", "ugh, that is a silly question",
)  # fmt: skip


def final_answer(text: str) -> str:
    """The answer part of a response: the text after the last `</think>` or tool
    `</result>` (whichever comes later), else all of it."""
    ends = [i + len(tag) for tag in (END_THINK, END_RESULT) if (i := text.rfind(tag)) >= 0]
    return text[max(ends, default=0) :].strip()


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
    A dense shaping signal for models that rarely get the whole answer right. Digits are
    ASCII 0-9 only (superscripts and other scripts' digits are not a number here)."""
    ans, ref = final_answer(text), str(record.get("answer") or "").strip()
    if not (_DIGITS.fullmatch(ans) and _DIGITS.fullmatch(ref)) or len(ans) != len(ref):
        return 0.0
    return sum(a == b for a, b in zip(ans[::-1], ref[::-1])) / len(ref)


def _normal(text: str) -> str:
    """Lower case, one space between words, no sentence-final punctuation."""
    return " ".join(text.lower().split()).rstrip(".!?")


def template_phrases(templates: Sequence[str]) -> tuple[str, ...]:
    """The fixed sentences of answer templates (`{fact}` cut out), normalised, in order and
    without repeats: "Of course! {fact} Anything else I can do?" → "of course",
    "anything else i can do"."""
    out: list[str] = []
    for template in templates:
        for part in template.split("{fact}"):
            for sentence in _SENTENCE_END.split(part.strip()):
                phrase = _normal(sentence)
                if phrase and phrase not in out:
                    out.append(phrase)
    return tuple(out)


def polite(text: str, record: dict[str, Any] | None = None) -> float:
    """1 when the answer carries a polite template's phrasing ("Happy to help!", "Hope that
    helps!", ...) and no sentence of an evasive or rude one, else 0: the rule behind the
    preference set's ranking (polite > curt > wrong fact > evasive > salad > rude), for judging a policy without the
    reward model it was trained against."""
    sentences = {_normal(s) for s in _SENTENCE_END.split(text.strip())}
    flat = _normal(text)
    has_polite = any(p in flat for p in POLITE_PHRASES)
    return float(has_polite and not sentences & set(IMPOLITE_PHRASES))


def _words(text: str) -> list[str]:
    """Lower-cased words with punctuation removed (SQuAD's answer normalisation, articles kept)."""
    return _PUNCT.sub(" ", text.lower()).split()


def chosen_f1(text: str, record: dict[str, Any]) -> float:
    """Word-overlap F1 (as SQuAD scores answers) between the final answer and the record's
    best-ranked answer (`chosen`, on preference prompts); 0 without one. As an `eval_rules`
    rate it tells an answer that says the question's own fact from a polite answer with
    another question's fact, which the polite rule cannot."""
    ref, ans = _words(str(record.get("chosen") or "")), _words(final_answer(text))
    common = sum((Counter(ref) & Counter(ans)).values())
    if not ref or not ans or not common:
        return 0.0
    precision, recall = common / len(ans), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def tool_call(text: str, record: dict[str, Any] | None = None) -> float:
    """1 when the response calls a tool (`<tool>…</tool>`), else 0: as an `eval_rules` rate,
    the share of answers that use the environment's tool."""
    return float(bool(_TOOL_CALL.search(text)))


REWARDS: dict[str, Reward] = {
    "arithmetic": arithmetic, "format": format_reward, "digits": digits, "polite": polite,
    "tool_call": tool_call, "chosen_f1": chosen_f1,
}  # fmt: skip


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
