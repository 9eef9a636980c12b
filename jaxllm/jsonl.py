"""One hardened reader for a line of JSONL, shared by every reader of user JSONL files.

`parse_line` turns one line (bytes or str) into a JSON object or raises `BadLine` with a
`kind` and a message saying what was wrong and what was expected; the caller adds `file:line`
(the data stage counts or raises by kind, the other readers raise `DataError`). No line can
end a run with anything but that: besides malformed JSON it catches

- nesting deeper than `MAX_DEPTH` levels (`json.loads` raises `RecursionError` near 1000,
  and deeply nested records break later recursive code, so the limit is fixed and low),
- numbers Python will not convert (more than 4300 digits: a plain `ValueError`),
- bytes that are not UTF-8, including UTF-8-encoded surrogates (`json.loads` on bytes lets
  them through),
- lone surrogates written as escapes (`"\\ud800"`): valid JSON, but not Unicode text (no
  UTF-8 encoding exists). Policy: such a line is **invalid text** (kind `bad_unicode`), never
  repaired: a silent U+FFFD would change the data, and no stage could encode the text as is.

A UTF-8 byte-order mark at the start of a line is ignored. `read_jsonl` streams a whole
(small) file through `parse_line`, raising `DataError` naming `file:line` on the first bad one.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jaxllm.errors import DataError

MAX_DEPTH = 100  # containers inside containers; real records rarely pass 10
KINDS = {
    "bad_utf8": "bytes that are not UTF-8",
    "bad_json": "a line that is not valid JSON",
    "too_deep": f"JSON nested more than {MAX_DEPTH} levels deep",
    "bad_unicode": "a string with a lone surrogate escape (not Unicode text)",
    "not_object": "JSON that is not an object",
}
_EXPECTED = "expected one JSON object per line"
_SURROGATE = re.compile("[\ud800-\udfff]")
_MAYBE_SURROGATE = re.compile(r"\\u[dD][89abcdefABCDEF]|" + _SURROGATE.pattern)  # escaped or not
_BOM = "\ufeff"


class BadLine(DataError):
    """A line that is not a usable JSON object; `kind` is a key of `KINDS`, the message says
    what was wrong and what was expected, without the file and line (the caller adds them)."""

    def __init__(self, kind: str, what: str) -> None:
        super().__init__(what)
        self.kind = kind
        self.what = what


def parse_line(line: bytes | str) -> dict[str, Any]:
    """The JSON object on one line, or `BadLine` (see the module docstring for the checks)."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            what = f"invalid UTF-8 at byte {e.start + 1}; expected UTF-8 text"
            raise BadLine("bad_utf8", what) from None
    line = line.removeprefix(_BOM)
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        what = f"malformed JSON ({e.msg} at column {e.colno}); {_EXPECTED}"
        raise BadLine("bad_json", what) from None
    except RecursionError:
        raise BadLine("too_deep", _too_deep()) from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise BadLine("bad_json", f"malformed JSON ({_first_line(e)}); {_EXPECTED}") from None
    if not isinstance(obj, dict):
        raise BadLine("not_object", f"JSON {type(obj).__name__}, expected a JSON object")
    # Both checks walk the record only when a cheap scan of the line says they might fail.
    if line.count("[") + line.count("{") > MAX_DEPTH and _depth(obj) > MAX_DEPTH:
        raise BadLine("too_deep", _too_deep())
    maybe = "\\u" in line or not line.isascii()
    if maybe and _MAYBE_SURROGATE.search(line) and _has_surrogate(obj):
        raise BadLine(
            "bad_unicode",
            "a string holds a lone surrogate escape (like \\ud800), which is not Unicode "
            "text; expected valid text (a surrogate pair escapes one character above U+FFFF)",
        )
    return obj


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for each non-blank line of a JSONL file, read as bytes
    line by line (gzip-compressed when the name ends `.gz`); the first bad line raises
    `DataError` naming `file:line`."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if raw.isspace():
                continue
            try:
                yield n, parse_line(raw)
            except BadLine as e:
                raise DataError(f"{path}:{n}: {e.what}; fix or remove the line") from None


def _too_deep() -> str:
    return f"JSON nested more than {MAX_DEPTH} levels deep; expected a flat record"


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:120] if text else type(e).__name__


def _children(x: Any) -> list[Any]:
    if isinstance(x, dict):
        return [*x.keys(), *x.values()]
    return list(x) if isinstance(x, list) else []


def _depth(obj: Any) -> int:
    """How many containers deep `obj` goes (an iterative walk: no recursion limit)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, dict | list):
            deepest = max(deepest, d)
            stack.extend((c, d + 1) for c in _children(x))
    return deepest


def _has_surrogate(obj: Any) -> bool:
    """Whether any string (key or value) in `obj` holds a lone surrogate code point."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            if _SURROGATE.search(x):
                return True
        else:
            stack.extend(_children(x))
    return False
