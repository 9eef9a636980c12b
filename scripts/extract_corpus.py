#!/usr/bin/env python3
"""Extract the bundled public-domain text corpus from installed Debian packages.

Writes ``jaxllm/assets/corpus/<source>.jsonl.gz``: one JSON object per line,
``{"text": "<s>...</s>", "source": "<source>"}``.  Standard library only.

Sources (apt packages in brackets):

* ``kjv``     King James Bible, one document per chapter    [bible-kjv bible-kjv-text]
* ``jargon``  Jargon File 4.4.7, one document per entry     [jargon-text]
* ``devil``   Bierce's Devil's Dictionary, one per headword [dict-devil]
* ``tang300`` 300 Tang poems, one document per poem         [fortunes-zh]
* ``song100`` 100 Song poems, one document per poem         [fortunes-zh]

Document conventions (all sources): NFC Unicode, ``\\n`` line breaks, no ``\\r``,
no trailing whitespace, no empty lines, no empty documents.  Prose paragraphs
are unwrapped to one line each; verse, code and ASCII art keep their line
breaks (and relative indentation).

Output is byte-for-byte reproducible (fixed order, gzip ``mtime=0`` and an empty
file-name header).  Usage::

    sudo apt-get install bible-kjv bible-kjv-text jargon-text dict-devil fortunes-zh
    python scripts/extract_corpus.py            # all sources
    python scripts/extract_corpus.py kjv devil  # a subset
    python scripts/extract_corpus.py --check    # verify committed files are up to date
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "jaxllm" / "assets" / "corpus"

BIBLE_BIN = "bible"
BIBLE_DATA = Path("/usr/lib/bible.data")
JARGON_TXT = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
DEVIL_DICT = Path("/usr/share/dictd/devil.dict.dz")
DEVIL_INDEX = Path("/usr/share/dictd/devil.index")
FORTUNE_DIR = Path("/usr/share/games/fortunes")

BOS, EOS = "<s>", "</s>"


class MissingSource(Exception):
    """An input file or program is absent; the message names the apt package."""


def _require_file(path: Path, packages: str) -> None:
    if not path.is_file():
        hint = ""
        if str(path).startswith("/usr/share/doc/"):
            hint = " (if it is installed, /usr/share/doc may be excluded by /etc/dpkg/dpkg.cfg.d/)"
        raise MissingSource(
            f"{path} not found; install it with: sudo apt-get install {packages}{hint}"
        )


# --------------------------------------------------------------------------- helpers

_WS_RUN = re.compile(r"[ \t\u00a0]{2,}")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _unwrap(lines: list[str], *, keep_hyphen_breaks: bool = False) -> str:
    """Join wrapped prose lines into one line, collapsing all whitespace runs.

    With ``keep_hyphen_breaks`` a line ending in "word-" is joined to the next
    without a space ("slave-" + "holder" -> "slave-holder"); "--" dashes are spaced.
    """
    text = ""
    for ln in lines:
        ln = " ".join(ln.split())
        if not ln:
            continue
        if text and not (keep_hyphen_breaks and re.search(r"[A-Za-z]-$", text)):
            text += " "
        text += ln
    return text


def _tidy_pre(line: str) -> str:
    """A preformatted line: keep leading indentation, drop trailing whitespace."""
    return line.rstrip()


def _squeeze_inner(line: str) -> str:
    """Keep leading indentation, collapse inner whitespace runs to one space."""
    body = line.lstrip(" ")
    return line[: len(line) - len(body)] + _WS_RUN.sub(" ", body).rstrip()


def _finish(text: str, where: str) -> str:
    """Normalize a document and check the corpus invariants."""
    text = unicodedata.normalize("NFC", text)
    lines = [ln.rstrip() for ln in text.split("\n")]
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    text = "\n".join(ln for ln in lines if ln.strip())
    if not text.strip():
        raise ValueError(f"{where}: empty document")
    bad = re.search(r"[\r\x00-\x08\x0b-\x1f\x7f]", text)
    if bad:
        raise ValueError(f"{where}: control character {bad.group()!r} in output")
    return text


# --------------------------------------------------------------------------- KJV


def extract_kjv() -> Iterator[str]:
    """One document per chapter: "Genesis 1" then "1 In the beginning ..." per verse."""
    exe = shutil.which(BIBLE_BIN)
    if exe is None:
        raise MissingSource(
            "the `bible` program was not found; install it with: "
            "sudo apt-get install bible-kjv bible-kjv-text"
        )
    _require_file(BIBLE_DATA, "bible-kjv-text")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}

    def run(*args: str) -> str:
        out = subprocess.run([exe, *args], env=env, capture_output=True, check=True)
        return out.stdout.decode("utf-8")

    # -f turns pretty-printing off: one verse per line, "Ge1:1 In the beginning ...".
    dump = run("-f", "Gen1:1-Rev22:21")
    verse_re = re.compile(r"^(?P<book>[1-3]?[A-Za-z]+)(?P<ch>\d+):(?P<v>\d+) (?P<text>.*)$")
    verses: list[tuple[str, int, int, str]] = []
    for line in dump.splitlines():
        if not line.strip():
            continue
        m = verse_re.match(line)
        if m is None:
            raise ValueError(f"kjv: unparsed line from `bible -f`: {line!r}")
        text = " ".join(m["text"].split())  # the dump has stray double/trailing spaces
        verses.append((m["book"], int(m["ch"]), int(m["v"]), text))

    abbrevs = list(dict.fromkeys(b for b, _, _, _ in verses))
    if len(abbrevs) != 66:
        raise ValueError(f"kjv: expected 66 books, got {len(abbrevs)}")
    # Full book names: pretty mode prints a "Genesis 1" heading before each chapter.
    pretty = run("-l100000", *(f"{a}1:1" for a in abbrevs))
    heads = [ln for ln in pretty.splitlines() if ln.strip() and not ln.startswith(" ")]
    names = {}
    for abbrev, head in zip(abbrevs, heads, strict=True):
        m = re.fullmatch(r"(.+) 1", head)
        if m is None:
            raise ValueError(f"kjv: unexpected heading {head!r} for {abbrev}")
        names[abbrev] = m[1]

    chapter_key = None
    body: list[str] = []
    n_chapters = 0

    def flush() -> Iterator[str]:
        if chapter_key is not None:
            book, ch = chapter_key
            yield _finish(f"{names[book]} {ch}\n" + "\n".join(body), f"kjv {book}{ch}")

    for book, ch, v, text in verses:
        if (book, ch) != chapter_key:
            yield from flush()
            chapter_key, body = (book, ch), []
            n_chapters += 1
        if v != len(body) + 1:
            raise ValueError(f"kjv: verse {book}{ch}:{v} out of sequence")
        body.append(f"{v} {text}")
    yield from flush()
    if len(verses) != 31102 or n_chapters != 1189:
        raise ValueError(
            f"kjv: got {len(verses)} verses / {n_chapters} chapters, expected 31102 / 1189"
        )


# --------------------------------------------------------------------------- Jargon File

_JARGON_HEAD = re.compile(r"^   :(?P<hw>[^:]+):(?:\s+(?P<rest>.*))?$")
_JARGON_LETTER = re.compile(r"^  [0-9A-Z]$")  # "  A" section headings before each index
_JARGON_XREF = re.compile(r"\{([^{}\n]+)\}")  # {cross-reference} markup of the text version
_XREF_WORDS = re.compile(r"[A-Za-z][A-Za-z0-9 '-]*")  # dangling refs such as {ID10T}
_JARGON_CARTOON = re.compile(r"^\((The next|This is the last) cartoon in the Crunchly saga")
_BOX_DRAWING = re.compile(r"[\u2500-\u257f]")


def _strip_xrefs(text: str, headwords: set[str]) -> str:
    """{foo} -> foo for cross-references; literal braces (code, {a,b} globs) stay."""

    def repl(m: re.Match[str]) -> str:
        inner = m[1]
        if inner.lower() in headwords or _XREF_WORDS.fullmatch(inner):
            return inner
        return m[0]

    return _JARGON_XREF.sub(repl, text)


def _strip_xrefs_table(line: str, headwords: set[str]) -> str:
    """Same inside a box-drawing table row, re-padding each cell to keep alignment."""
    cells = line.split("\u2502")  # │
    for k, cell in enumerate(cells):
        new = _strip_xrefs(cell, headwords)
        if new != cell and cell.endswith(" "):
            cells[k] = new + " " * (len(cell) - len(new))
    return "\u2502".join(cells)


_LIST_MARK = re.compile(r"(?:•|\d+\.) +")  # "• item" / "10. item" with hanging indent


def _wrapped_block(block: list[str]) -> bool:
    """An indented block that is really wrapped prose (block quote or list item)."""
    if any(re.search(r"\S {2,}\S", ln) or _BOX_DRAWING.search(ln) for ln in block):
        return False
    first = block[0].lstrip(" ")
    mark = _LIST_MARK.match(first)
    if len(block) < 2 and not mark:
        return False
    hang = _indent(block[0]) + (mark.end() if mark else 0)
    return all(_indent(ln) == hang for ln in block[1:]) and all(len(ln) >= 60 for ln in block[:-1])


def _jargon_entry(lines: list[str], headwords: set[str], where: str) -> str:
    """Render one lexicon entry (lines still carry the file's 3-space margin)."""
    blocks: list[list[str]] = []
    cur: list[str] = []
    for line in lines:
        if line.strip():
            cur.append(line.rstrip())
        elif cur:
            blocks.append(cur)
            cur = []
    if cur:
        blocks.append(cur)

    out: list[str] = []
    for i, block in enumerate(blocks):
        if i == 0:  # ":headword: /pron/, n." (may wrap) -> "headword: /pron/, n."
            m = _JARGON_HEAD.match(block[0])
            assert m is not None, where
            head = m["hw"] + ":" + (" " + m["rest"] if m["rest"] else "")
            out.append(_strip_xrefs(_unwrap([head, *block[1:]]), headwords))
            continue
        is_prose = all(_indent(ln) == 3 for ln in block) and not any(
            re.search(r"\S {2,}\S", ln) or _BOX_DRAWING.search(ln) for ln in block
        )
        if is_prose:
            para = _strip_xrefs(_unwrap(block), headwords)
            if not _JARGON_CARTOON.match(para):  # skip nav notes for the omitted cartoons
                out.append(para)
        elif _wrapped_block(block):  # indented quote or list item: unwrap, drop indent
            out.append(_strip_xrefs(_unwrap(block), headwords))
        else:  # code, tables, ASCII art, verse: keep layout, drop the 3-space margin
            cut = min(3, min(_indent(ln) for ln in block))
            for ln in block:
                if "\u2502" in ln:  # table row: re-pad cells to keep the grid aligned
                    ln = _strip_xrefs_table(ln, headwords)
                else:
                    ln = _strip_xrefs(ln, headwords)
                out.append(_tidy_pre(ln[cut:]))
    return _finish("\n".join(out), where)


def extract_jargon() -> Iterator[str]:
    """One document per Jargon Lexicon entry ("headword: /pron/, n." then paragraphs)."""
    _require_file(JARGON_TXT, "jargon-text")
    with gzip.open(JARGON_TXT, "rt", encoding="utf-8") as f:
        raw = f.read()
    lines = raw.replace("\u00a0", " ").replace("\r", "").split("\n")
    try:
        start = next(i for i, ln in enumerate(lines) if ln.strip() == "Part II. The Jargon Lexicon")
        stop = next(
            i for i in range(start, len(lines)) if lines[i].strip() == "Part III. Appendices"
        )
    except StopIteration as e:
        raise ValueError("jargon: Part II / Part III markers not found") from e

    entries: list[list[str]] = []
    entry: list[str] | None = None
    n_letters = 0
    for line in lines[start:stop]:
        if _JARGON_HEAD.match(line):
            entry = [line]
            entries.append(entry)
        elif _JARGON_LETTER.match(line):  # letter heading + index of headwords: skip
            entry = None
            n_letters += 1
        elif entry is not None:
            entry.append(line)
    if n_letters != 27:
        raise ValueError(f"jargon: expected 27 letter sections, got {n_letters}")
    headwords = {_JARGON_HEAD.match(e[0])["hw"].lower() for e in entries}
    for e in entries:
        yield _jargon_entry(e, headwords, f"jargon {e[0].strip()}")


# --------------------------------------------------------------------------- Devil's Dictionary

_DICTD_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_num(s: str) -> int:
    n = 0
    for ch in s:
        n = n * 64 + _DICTD_B64.index(ch)
    return n


def _devil_entry(text: str, where: str) -> str:
    """Unwrap prose paragraphs (first line may be indented); keep verse lines."""
    out: list[str] = []
    for block in re.split(r"\n[ \t]*\n", text.replace("\r", "").strip("\n")):
        lines = [ln.rstrip() for ln in block.split("\n") if ln.strip()]
        if not lines:
            continue
        verse_ind = [_indent(ln) for ln in lines if 0 < _indent(ln) < 20]
        cut = min(verse_ind) if verse_ind else 0
        para: list[str] = []
        j = 0
        while j < len(lines):
            line = lines[j]
            ind = _indent(line)
            nxt = _indent(lines[j + 1]) if j + 1 < len(lines) else None
            # An indented quotation in prose form: first line indented deeper than the
            # wrapped lines that follow it ("        We hold these truths ...\n    created").
            if nxt is not None and 0 < nxt < ind < 20:
                k = j + 1
                while k < len(lines) and _indent(lines[k]) == nxt:
                    k += 1
                if all(len(x) >= 55 for x in lines[j : k - 1]):
                    if para:
                        out.append(_unwrap(para, keep_hyphen_breaks=True))
                        para = []
                    out.append(_unwrap(lines[j:k], keep_hyphen_breaks=True))
                    j = k
                    continue
            j += 1
            if ind == 0 and para:
                para.append(line)  # continuation of a wrapped paragraph
            elif ind == 0 or nxt == 0:
                if para:  # new paragraph (possibly with an indented first line)
                    out.append(_unwrap(para, keep_hyphen_breaks=True))
                para = [line]
            else:  # verse line, or a right-aligned attribution such as "G.J."
                if para:
                    out.append(_unwrap(para, keep_hyphen_breaks=True))
                    para = []
                out.append(line.strip() if ind >= 20 else _squeeze_inner(line[cut:]))
        if para:
            out.append(_unwrap(para, keep_hyphen_breaks=True))
    return _finish("\n".join(out), where)


def extract_devil() -> Iterator[str]:
    """One document per headword entry, in dictionary (file) order."""
    _require_file(DEVIL_DICT, "dict-devil")
    _require_file(DEVIL_INDEX, "dict-devil")
    with gzip.open(DEVIL_DICT, "rb") as f:  # dictzip is gzip-compatible
        data = f.read()
    spans = set()
    for line in DEVIL_INDEX.read_text(encoding="utf-8").splitlines():
        word, off, length = line.split("\t")
        if word.startswith("00database"):  # dictd metadata (URL, preface, alphabet)
            continue
        spans.add((_dictd_num(off), _dictd_num(length)))  # aliases share one span
    for off, length in sorted(spans):
        chunk = data[off : off + length].decode("utf-8")
        yield _devil_entry(chunk, f"devil @{off}")


# --------------------------------------------------------------------------- fortunes-zh

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _decode_fortune(raw: bytes, where: str) -> str:
    for enc in ("utf-8", "gb18030"):  # Debian ships UTF-8 now; older releases used GB2312
        try:
            return raw.decode(enc)
        except UnicodeDecodeError:
            continue
    raise ValueError(f"{where}: neither UTF-8 nor GB18030")


def _extract_fortune(name: str) -> Iterator[str]:
    path = FORTUNE_DIR / name
    _require_file(path, "fortunes-zh")
    text = _decode_fortune(path.read_bytes(), name)
    text = _ANSI.sub("", text).replace("\r\n", "\n").replace("\r", "\n")
    entry: list[str] = []
    n = 0
    for line in [*text.split("\n"), "%"]:
        if line.strip() == "%":  # fortune separator (sometimes with trailing blanks)
            lines = [ln.strip(" \t\u3000") for ln in entry]
            lines = [ln for ln in lines if ln]
            if lines:
                n += 1
                yield _finish("\n".join(lines), f"{name} #{n}")
            entry = []
        else:
            entry.append(line)


def extract_tang300() -> Iterator[str]:
    """One document per poem: 《title》, 作者：author, then the poem lines."""
    return _extract_fortune("tang300")


def extract_song100() -> Iterator[str]:
    """One document per poem: 题目:《title》, 作者:author (dates), then the poem lines."""
    return _extract_fortune("song100")


# --------------------------------------------------------------------------- driver

SOURCES: dict[str, Callable[[], Iterator[str]]] = {  # output order == this order
    "kjv": extract_kjv,
    "jargon": extract_jargon,
    "devil": extract_devil,
    "tang300": extract_tang300,
    "song100": extract_song100,
}


def build(name: str) -> tuple[bytes, int, int]:
    """Return (gzipped JSONL bytes, n_docs, n_chars) for one source."""
    extract = SOURCES[name]
    buf = io.BytesIO()
    n_docs = n_chars = 0
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        for text in extract():
            n_docs += 1
            n_chars += len(text)
            rec = {"text": f"{BOS}{text}{EOS}", "source": name}
            gz.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
    if n_docs == 0:
        raise ValueError(f"{name}: no documents extracted")
    return buf.getvalue(), n_docs, n_chars


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "sources",
        nargs="*",
        metavar="SOURCE",
        help=f"subset to extract (default: all of {', '.join(SOURCES)})",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    ap.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 if any output file differs from a fresh build",
    )
    args = ap.parse_args(argv)
    names = args.sources or list(SOURCES)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        ap.error(f"unknown source(s) {', '.join(unknown)}; choose from {', '.join(SOURCES)}")

    if not args.check:
        args.out.mkdir(parents=True, exist_ok=True)
    header = f"{'source':<8} {'docs':>6} {'chars':>10} {'gz bytes':>9}  file"
    total_docs = total_chars = total_gz = 0
    stale = []
    for name in names:
        try:
            blob, n_docs, n_chars = build(name)
        except MissingSource as e:
            print(f"error: {name}: {e}", file=sys.stderr)
            return 2
        if header:
            print(header)
            header = ""
        path = args.out / f"{name}.jsonl.gz"
        if args.check:
            if not path.is_file() or path.read_bytes() != blob:
                stale.append(path)
        else:
            tmp = path.with_suffix(".gz.tmp")
            tmp.write_bytes(blob)
            os.replace(tmp, path)
        total_docs, total_chars, total_gz = (
            total_docs + n_docs,
            total_chars + n_chars,
            total_gz + len(blob),
        )
        try:
            shown = path.resolve().relative_to(REPO_ROOT)
        except ValueError:
            shown = path
        print(f"{name:<8} {n_docs:>6} {n_chars:>10} {len(blob):>9}  {shown}")
    print(f"{'total':<8} {total_docs:>6} {total_chars:>10} {total_gz:>9}")
    print("(chars = Unicode code points of document text, excluding the <s>/</s> wrappers)")
    if stale:
        for p in stale:
            print(f"stale: {p} differs from a fresh build", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
