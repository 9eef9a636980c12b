"""`jaxllm.jsonl`: the one line reader every JSONL reader uses. Hostile lines (deep nesting,
lone surrogates, huge numbers, bad bytes) become one-line errors naming file:line; the same
lines are run through the SFT, preference and prompt readers in their own tests."""

import json

import pytest

from jaxllm.config import from_dict
from jaxllm.errors import DataError
from jaxllm.jsonl import MAX_DEPTH, BadLine, parse_line, read_jsonl
from jaxllm.trainers.generate import read_prompts
from jaxllm.trainers.score import read_inputs

HOSTILE_LINES = {  # case: (kind, a line that must not take a run down)
    "nested_100k_brackets": ("too_deep", b"[" * 100_000 + b"]" * 100_000),
    "nested_100k_in_object": ("too_deep", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "nested_150_in_object": ("too_deep", b'{"prompt": "x", "m": ' + b"[" * 150 + b"]" * 150 + b"}"),
    "lone_surrogate_escape": ("bad_unicode", b'{"prompt": "bad \\ud800 char", "response": "r"}'),
    "utf8_encoded_surrogate": ("bad_utf8", b'{"prompt": "bad \xed\xa0\x80", "response": "r"}'),
    "integer_of_5000_digits": ("bad_json", b'{"prompt": "p", "n": ' + b"7" * 5000 + b"}"),
}
HOSTILE = sorted(HOSTILE_LINES)


def write_with_hostile(path, good: dict, case: str):
    """A JSONL file: `good`, then the hostile line of `case` (line 2), then `good` again."""
    row = json.dumps(good).encode()
    path.write_bytes(row + b"\n" + HOSTILE_LINES[case][1] + b"\n" + row + b"\n")
    return path


def assert_one_line_at(err: Exception, where: str) -> None:
    assert str(err).startswith(f"{where}: "), str(err)[:200]
    assert "\n" not in str(err) and len(str(err)) < 400


@pytest.mark.parametrize("case", HOSTILE)
def test_parse_line_names_the_kind(case):
    kind, line = HOSTILE_LINES[case]
    with pytest.raises(BadLine) as e:
        parse_line(line)
    assert e.value.kind == kind and "expected" in e.value.what
    with pytest.raises(BadLine):  # the same line as text (if it decodes)
        parse_line(line.decode("utf-8", "surrogatepass"))


def test_parse_line_keeps_good_text():
    assert parse_line('{"a": "\\ud83d\\ude00"}') == {"a": "\U0001f600"}  # a pair is one char
    assert parse_line('{"a": "\\\\ud800"}') == {"a": "\\ud800"}  # a backslash, then letters
    assert parse_line("\ufeff{}") == {}  # a byte-order mark is not data
    deep = "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)
    assert parse_line('{"a": ' + deep + "}")["a"] is not None  # exactly MAX_DEPTH levels
    with pytest.raises(BadLine, match="nested more than"):
        parse_line('{"a": [' + deep + "]}")


@pytest.mark.parametrize("case", HOSTILE)
def test_read_jsonl_names_file_and_line(tmp_path, case):
    path = write_with_hostile(tmp_path / "x.jsonl", {"prompt": "p"}, case)
    rows = read_jsonl(path)
    assert next(rows) == (1, {"prompt": "p"})
    with pytest.raises(DataError) as e:
        next(rows)
    assert_one_line_at(e.value, f"{path}:2")


@pytest.mark.parametrize("case", HOSTILE)
def test_generate_prompts_file_and_score_texts_file(tmp_path, case):
    path = write_with_hostile(tmp_path / "p.jsonl", {"prompt": "p", "text": "t"}, case)
    cfg = from_dict({"stage": "generate", "generate": {"prompts_file": str(path)}})
    with pytest.raises(DataError) as e:
        read_prompts(cfg)
    assert_one_line_at(e.value, f"{path}:2")
    cfg = from_dict({"stage": "score", "score": {"texts_file": str(path)}})
    with pytest.raises(DataError) as e:
        read_inputs(cfg.score)
    assert_one_line_at(e.value, f"{path}:2")
