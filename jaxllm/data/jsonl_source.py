"""`JsonlSource`: random access to the records of plain `.jsonl` files, for grain.

grain's `MapDataset.source` needs `__len__` and `__getitem__`. We scan each file once for
newlines (numpy over 16 MiB chunks, ~1 s per GB) and keep only two numpy arrays — the byte
offset (int64) and length (int32) of every record — so millions of lines cost ~12 bytes each.
A record is read with `os.pread`, which is thread-safe (no shared file position), so grain's
read threads can share one source. File descriptors are opened lazily per process and dropped
on pickling, so the source can be copied to grain worker processes.

Blank lines (empty or whitespace only, of any length, e.g. a trailing newline or `\\r\\n`
endings) are skipped: they carry no record, and writers commonly leave one at the end. Each
line is parsed by `jaxllm.jsonl.parse_line` (hostile lines included: too deep, lone
surrogates, not UTF-8); a line that is not a usable JSON object (or lacks a `require`d key,
or holds a non-string there) raises `DataError` naming the file and line when it is read.
A last line without a trailing newline is a record like any other.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.errors import DataError
from jaxllm.jsonl import BadLine, parse_line

_CHUNK = 16 << 20  # bytes read per step while indexing
_TEXT = np.ones(256, bool)  # bytes that make a line non-blank (all but ASCII whitespace,
_TEXT[list(b" \t\n\r\x0b\x0c")] = False  # the set `bytes.isspace` and `read_jsonl` use)


def _scan_lines(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets and lengths of the non-blank lines of `path` (without the newline),
    streamed chunk by chunk; a line of any length that is whitespace only is left out."""
    newlines, text = [], []  # per chunk: newline offsets, whether the line each ends has text
    size, open_text = 0, False  # open_text: the line running on into the next chunk has text
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            buf = np.frombuffer(chunk, np.uint8)
            nl = np.flatnonzero(buf == 10)
            has = _segment_text(buf, nl)
            has[0] |= open_text
            newlines.append(nl + size)
            text.append(has[:-1])
            size, open_text = size + len(chunk), bool(has[-1])
    ends = np.concatenate([*newlines, np.array([size], np.int64)]).astype(np.int64)
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    lengths = ends - starts
    keep = np.concatenate([*text, np.array([open_text])])
    if lengths.max(initial=0) >= 2**31:
        raise DataError(f"{path}: a line is longer than 2 GiB; is this really JSONL?")
    return starts[keep], lengths[keep].astype(np.int32)


def _segment_text(buf: np.ndarray, nl: np.ndarray) -> np.ndarray:
    """Whether each of the len(nl) + 1 pieces of a chunk cut at its newlines holds a byte that
    is not whitespace: one vectorised pass (piece k > 0 starts at its newline, a blank byte, so
    no piece is empty for `reduceat`)."""
    return np.logical_or.reduceat(_TEXT[buf], np.concatenate([[0], nl]))


class JsonlSource:
    """Random-access records (parsed JSON objects) of one or more `.jsonl` files, in order."""

    def __init__(self, paths: Sequence[str | Path], require: Sequence[str] = ()) -> None:
        self._paths = [Path(p) for p in paths]
        self._require = tuple(require)
        starts, lengths, counts = [], [], []
        for path in self._paths:
            if not path.is_file():
                raise DataError(f"{path}: JSONL file not found")
            s, n = _scan_lines(path)
            starts.append(s)
            lengths.append(n)
            counts.append(len(s))
        self._starts = np.concatenate([np.zeros(0, np.int64), *starts])
        self._lengths = np.concatenate([np.zeros(0, np.int32), *lengths])
        self._ends = np.cumsum(counts, dtype=np.int64)  # record index where each file ends
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._starts)

    def __repr__(self) -> str:
        return f"JsonlSource({len(self._paths)} files, {len(self)} records)"

    def require_records(self, expected: str, key: str = "") -> None:
        """Raises `DataError` when the files hold no record (empty, or blank lines only),
        naming them, the config `key` that names them (if given) and the `expected` records:
        an empty file is its own problem, not one of what later filters or cuts keep."""
        if len(self):
            return
        where = ", ".join(str(p) for p in self._paths) or "no files"
        head = f"config key '{key}': {where} holds no records" if key else f"{where}: no records"
        raise DataError(f"{head}; expected JSONL lines of {expected}")

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for {self!r}")
        file_index = int(np.searchsorted(self._ends, index, side="right"))
        start, length = int(self._starts[index]), int(self._lengths[index])
        raw = os.pread(self._fd(file_index), length, start)
        try:
            record = parse_line(raw)
        except BadLine as e:
            raise self._error(file_index, start, f"{e.what}; got {raw[:40]!r}") from None
        missing = [k for k in self._require if k not in record]
        if missing:
            raise self._error(file_index, start, f"record has no key {missing[0]!r}")
        bad = [k for k in self._require if not isinstance(record[k], str)]
        if bad:
            value = json.dumps(record[bad[0]])[:40]
            raise self._error(file_index, start, f"{bad[0]!r} must be a string, got {value}")
        return record

    def _fd(self, file_index: int) -> int:
        if self._pid != os.getpid():  # forked: do not share descriptors with the parent
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(file_index)
        if fd is None:  # two threads may race here: keep one descriptor, close the other
            new = os.open(self._paths[file_index], os.O_RDONLY)
            fd = self._fds.setdefault(file_index, new)
            if fd != new:
                os.close(new)
        return fd

    def _error(self, file_index: int, offset: int, what: str) -> DataError:
        """A `DataError` naming file and 1-based line; counting lines is fine on this cold path."""
        line, done = 1, 0
        with open(self._paths[file_index], "rb") as f:
            while done < offset:
                chunk = f.read(min(_CHUNK, offset - done))
                line, done = line + chunk.count(b"\n"), done + len(chunk)
        return DataError(f"{self._paths[file_index]}:{line}: {what}; fix or remove the line")

    def close(self) -> None:
        """Closes the open file descriptors (they reopen on the next read)."""
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __del__(self) -> None:
        # AttributeError: __init__ failed early; TypeError: interpreter shutdown
        with contextlib.suppress(OSError, AttributeError, TypeError):
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()
