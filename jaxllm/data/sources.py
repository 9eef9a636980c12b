"""Streaming readers for corpus sources, and the cleaned shards that `stage: data` writes.

A source (`SourceConfig`) is a file or a glob of files, each JSONL (`{"text": ...}` per line) or
plain text (documents separated by blank lines), gzip-compressed when the name ends in `.gz`.
Files are read line by line as bytes and decoded per line, so memory stays flat and an invalid
byte is reported with its line.

Bad input never disappears silently. Each problem has a kind (`ERROR_KINDS`) and a one-line
message `<file>:<line>: <what was wrong>; <what was expected>` (line 0 = the file as a whole).
With `on_error: skip` the record is skipped and logged (`ErrorLog`: counts per kind and the
first examples); with `on_error: fail` the message is raised as `DataError`.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from jaxllm.config import SourceConfig, resolve_path
from jaxllm.errors import DataError
from jaxllm.jsonl import KINDS as JSONL_KINDS
from jaxllm.jsonl import BadLine, parse_line, read_jsonl

ERROR_KINDS = {
    "missing_file": "no such file",
    "empty_file": "a file without documents",
    **JSONL_KINDS,  # bad_utf8, bad_json, too_deep, bad_unicode, not_object: see jaxllm/jsonl.py
    "missing_text": "no string under the text key",
    "bad_gzip": "a corrupt or truncated gzip stream",
    "unreadable": "a file that cannot be opened",
}
_PROGRESS_LINES = 1024  # report progress every this many lines


class Record(NamedTuple):
    """One document as read: its text (markers untouched), where it came from, and its size."""

    text: str
    path: str
    line: int  # 1-based; for plain text, the document's first line
    nbytes: int  # uncompressed input bytes this record spans


class ErrorLog:
    """Bad-input policy and log: `report` raises (on_error="fail") or counts and keeps the first
    `max_examples` messages (on_error="skip"), so the data report stays small."""

    def __init__(self, on_error: str = "skip", max_examples: int = 50) -> None:
        if on_error not in ("skip", "fail"):
            raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
        self.on_error = on_error
        self.max_examples = max_examples
        self.counts: Counter[str] = Counter()
        self.examples: list[str] = []

    def report(self, kind: str, where: str, what: str) -> None:
        message = f"{where}: {what}".replace("\n", " ")
        if self.on_error == "fail":
            raise DataError(message)
        self.counts[kind] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(message)

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": dict(sorted(self.counts.items())),
            "examples": list(self.examples),
            "examples_left_out": sum(self.counts.values()) - len(self.examples),
        }


def source_name(src: SourceConfig) -> str:
    """`name`, else the path's file name without extensions (a glob's folder name)."""
    if src.name:
        return src.name
    p = Path(src.path.removeprefix("asset:"))
    stem = p.name.split(".")[0]
    if any(c in stem for c in "*?[") or not stem:
        stem = p.parent.name or "source"
    return stem


def source_files(src: SourceConfig) -> list[Path]:
    """The existing files of a source, sorted; a glob may match several, a plain path one."""
    path = resolve_path(src.path)
    if any(c in str(path) for c in "*?["):
        return sorted(p for p in map(Path, glob.glob(str(path), recursive=True)) if p.is_file())
    return [path] if path.is_file() else []


def file_format(path: Path, fmt: str) -> str:
    """ "jsonl" or "text": `fmt` unless it is "auto", then by extension (.jsonl/.json[.gz])."""
    if fmt != "auto":
        return fmt
    name = path.name.removesuffix(".gz")
    return "jsonl" if name.endswith((".jsonl", ".json")) else "text"


def read_source(
    src: SourceConfig, errors: ErrorLog, progress: Callable[[int], object] | None = None
) -> Iterator[Record]:
    """Yields the documents of every file of `src` in order; `progress(n)` is told on-disk bytes
    as they are consumed. Problems go to `errors` (which raises if on_error is "fail")."""
    files = source_files(src)
    if not files:
        path = resolve_path(src.path)
        what = "is a directory" if path.is_dir() else "no such file"
        errors.report(
            "missing_file",
            f"{src.path}:0",
            f"{what} (resolved to {path}); expected a file or a glob matching at least one file",
        )
    for path in files:
        yield from _read_file(path, file_format(path, src.format), src.text_key, errors, progress)


def _read_file(
    path: Path,
    fmt: str,
    text_key: str,
    errors: ErrorLog,
    progress: Callable[[int], object] | None,
) -> Iterator[Record]:
    """One file: opens it (gzip by name), streams its records and reports an empty file."""
    counter = _LineCounter()
    try:
        raw = open(path, "rb")  # noqa: SIM115 (closed below; the open itself may fail)
    except OSError as e:
        errors.report("unreadable", f"{path}:0", f"cannot open ({e.strerror}); check permissions")
        return
    with raw:
        gz = path.name.lower().endswith(".gz")
        stream: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
        lines = _tracked(stream, raw, counter, progress)
        try:
            if fmt == "jsonl":
                yield from _jsonl_records(lines, str(path), text_key, errors)
            else:
                yield from _text_records(lines, str(path), errors)
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            errors.report(
                "bad_gzip",
                f"{path}:{counter.line + 1}",
                f"corrupt or truncated gzip data ({e}); expected a complete .gz file",
            )
            return
    if counter.non_blank == 0:
        errors.report(
            "empty_file", f"{path}:0", f"empty file (no {fmt} documents); expected at least one"
        )


class _LineCounter:
    """Where `_tracked` is in its file, for messages after the line iterator has stopped."""

    line = 0
    non_blank = 0


def _tracked(
    stream: BinaryIO,
    raw: BinaryIO,
    counter: _LineCounter,
    progress: Callable[[int], object] | None,
) -> Iterator[tuple[int, bytes]]:
    """(line number, line bytes) for the non-blank lines; blank ones end text documents, so
    they come through as (n, b"")."""
    done = 0
    for n, line in enumerate(stream, 1):
        counter.line = n
        if n == 1 and line.startswith(codecs.BOM_UTF8):
            line = line[len(codecs.BOM_UTF8) :]
        if progress is not None and n % _PROGRESS_LINES == 0:
            pos = raw.tell()
            progress(pos - done)
            done = pos
        if line.isspace():
            yield n, b""
            continue
        counter.non_blank += 1
        yield n, line
    if progress is not None:
        progress(raw.tell() - done)


def _jsonl_records(
    lines: Iterator[tuple[int, bytes]], path: str, key: str, errors: ErrorLog
) -> Iterator[Record]:
    for n, raw in lines:
        if not raw:
            continue
        where = f"{path}:{n}"
        try:
            obj = parse_line(raw)
        except BadLine as e:
            errors.report(e.kind, where, f"{e.what}; {_snip(raw)}")
            continue
        text = obj.get(key)
        if not isinstance(text, str):
            got = "missing" if key not in obj else f"a {type(text).__name__}"
            errors.report(
                "missing_text",
                where,
                f"text key {key!r} is {got}, expected a string (keys: {', '.join(list(obj)[:8])})",
            )
            continue
        yield Record(text, path, n, len(raw))


def _text_records(
    lines: Iterator[tuple[int, bytes]], path: str, errors: ErrorLog
) -> Iterator[Record]:
    """Plain text: a document is a run of non-blank lines."""
    doc: list[bytes] = []
    first = 0
    for n, raw in lines:
        if raw:
            if not doc:
                first = n
            doc.append(raw)
            continue
        if doc:
            yield from _text_doc(doc, path, first, errors)
            doc = []
    if doc:
        yield from _text_doc(doc, path, first, errors)


def _text_doc(doc: list[bytes], path: str, first: int, errors: ErrorLog) -> Iterator[Record]:
    data = b"".join(doc)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None:
        yield Record(text, path, first, len(data))
        return
    for i, raw in enumerate(doc):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            errors.report(
                "bad_utf8",
                f"{path}:{first + i}",
                f"invalid UTF-8 at byte {e.start + 1}; the document starting at line "
                f"{first} is skipped; {_snip(raw)}",
            )
            return


def _snip(raw: bytes, limit: int = 60) -> str:
    """A short, one-line view of the offending input."""
    text = raw.decode("utf-8", "backslashreplace").strip()
    return f"got {text[:limit]!r}" + ("..." if len(text) > limit else "")


# ----------------------------------------------------------------------------- cleaned output


def cleaned_shards(data_dir: Path, split: str) -> list[Path]:
    """The JSONL shards of a curated split, in order (`<data_dir>/<split>/shard-*.jsonl`).
    A split that curation left empty has no shards; a missing split directory is an error."""
    folder = Path(data_dir) / split
    if not folder.is_dir():
        raise DataError(
            f"{folder}: no such split directory; expected the output of a `stage: data` run"
        )
    return sorted(folder.glob("shard-*.jsonl"))


def iter_cleaned(data_dir: Path, split: str) -> Iterator[dict]:
    """The records `{"text": "<s>…</s>", "source": name}` of a curated split, in shard order."""
    for shard in cleaned_shards(data_dir, split):
        for _, record in read_jsonl(shard):
            yield record
