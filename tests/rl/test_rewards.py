"""Rule rewards on hand examples."""

import pytest

from jaxllm.errors import ConfigError
from jaxllm.trainers.rewards import (
    REWARDS,
    arithmetic,
    chosen_f1,
    digits,
    final_answer,
    format_reward,
    get_reward,
    weighted_reward,
)

REC = {"answer": "52"}


def test_final_answer_after_think():
    assert final_answer("<think>13 - 8 = 5. 5 + 47 = 52</think> 52 ") == "52"
    assert final_answer(" 52\n") == "52"
    assert final_answer("<think>a</think>x</think>7") == "7"  # the last </think>


def test_arithmetic():
    assert arithmetic("<think>13 - 8 = 5. 5 + 47 = 52</think>52", REC) == 1.0
    assert arithmetic("52", REC) == 1.0
    assert arithmetic(" 52 ", REC) == 1.0
    assert arithmetic("<think>52</think>51", REC) == 0.0
    assert arithmetic("520", REC) == 0.0
    assert arithmetic("52", {"answer": None}) == 0.0


def test_format():
    assert format_reward("<think>13 - 8 = 5</think>5", REC) == 1.0
    assert format_reward("  <think>\nx\n</think> 5", REC) == 1.0
    assert format_reward("<think>13 - 8 = 5</think>", REC) == 0.0  # empty answer
    assert format_reward("<think>13 - 8 = 5</think>   ", REC) == 0.0
    assert format_reward("5 <think>x</think>5", REC) == 0.0  # must open with <think>
    assert format_reward("<think>no close 5", REC) == 0.0


def test_digits_partial_credit():
    assert digits("52", REC) == 1.0
    assert digits("42", REC) == 0.5  # units right
    assert digits("57", REC) == 0.5  # tens right
    assert digits("5", REC) == 0.0 and digits("abc", REC) == 0.0


def test_digits_are_ascii_only():
    # str.isdigit() takes superscripts, Arabic-Indic and full-width digits: none is a number
    for text in ("4\u00b2", "4\u0662", "\uff14\uff12", "\u2074\u2082"):
        assert digits(text, {"answer": "42"}) == 0.0, text
    assert digits("4\u00b2", {"answer": "4\u00b2"}) == 0.0  # nor as the reference
    assert digits("<think>x</think> 43", {"answer": "42"}) == 0.5


def test_registry_and_weights():
    assert set(REWARDS) >= {"arithmetic", "format", "digits"}
    r = weighted_reward(["arithmetic", "format"], [1.0, 0.5])
    assert r("<think>x</think>52", REC) == 1.5
    assert r("52", REC) == 1.0
    assert r("<think>x</think>5", REC) == 0.5
    with pytest.raises(ConfigError, match="grpo.rewards.*unknown reward 'exact'"):
        get_reward("exact")


def test_final_answer_after_a_tool_result():
    assert final_answer("<tool>17+25</tool><result>42</result> 42") == "42"
    assert arithmetic("<tool>17+25</tool><result>42</result>42", {"answer": "42"}) == 1.0
    assert arithmetic("<tool>17+25</tool><result>42</result>", {"answer": "42"}) == 0.0
    assert final_answer("<result>1</result><think>a</think>2") == "2"  # whichever is later
    assert final_answer("<think>a</think><result>1</result>3") == "3"


def test_chosen_f1_by_hand():
    rec = {"chosen": "Happy to help! Open My Orders and press Cancel."}
    assert chosen_f1("Happy to help! Open My Orders and press Cancel.", rec) == 1.0
    # "open my orders and press buy again" vs the 9 reference words: 5 in common
    # (open, my, orders, and, press): precision 5/7, recall 5/9, F1 = 2PR/(P+R) = 10/16
    assert chosen_f1("Open my orders, and press Buy Again!", rec) == pytest.approx(10 / 16)
    assert chosen_f1("Go away.", rec) == 0.0
    assert chosen_f1("Happy to help!", {"answer": "x"}) == 0.0  # no best answer: 0
    assert chosen_f1("<think>hm</think> Happy to help!", rec) == pytest.approx(
        2 * 1 * 3 / 9 / (1 + 3 / 9)
    )
