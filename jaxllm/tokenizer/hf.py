"""`HFTokenizer`: a HF `tokenizer.json` (byte-level BPE of GPT-2, Llama 3, Qwen2, ...) behind
the interface of `jaxllm.tokenizer.Tokenizer`, built on the `tokenizers` library.

Special tokens (bos/eos/pad/unk) come from `tokenizer_config.json` next to the file; a kind it
does not name (GPT-2's hub layout names none) from `special_tokens_map.json`, else from the ids
of `generation_config.json` / `config.json`. Encoding never adds them implicitly
(`add_bos`/`add_eos` do, as in `Tokenizer`). `eos_ids`: the EOS and every other id that
`generation_config.json` lists as an end of generation (Llama-3-Instruct's two).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxllm.errors import JaxllmError
from jaxllm.tokenizer.chat import END_TOKEN, ROLE_TOKENS

# (generation_config.json: its eos ids end generation too; an export merges it into its own)
HF_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"
)  # fmt: skip
SPECIAL_KINDS = ("bos", "eos", "pad", "unk")
# Where the `<s>` / `</s>` aliases apply: only in jaxllm's chat template as text (`render_text`:
# `<s>` right before a role token, `</s>` right after `<|end|>`); elsewhere they are text.
_ALIAS_AT = {
    "<s>": "<s>(?=" + "|".join(map(re.escape, ROLE_TOKENS.values())) + ")",
    "</s>": "(?<=" + re.escape(END_TOKEN) + ")</s>",
}


def _token_str(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """A loaded `tokenizer.json`; build it with `HFTokenizer.load(path)`."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as _Tok

        self.path = path
        try:
            self._tok = _Tok.from_file(str(path))
        except Exception as e:  # the Rust error types are not importable
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise JaxllmError(f"{path}: not a valid tokenizer.json ({first})") from None
        self._ids = self._special_token_ids(path.parent)
        self._gen_eos = [i for i in _id_list(_read_json(path.parent / "generation_config.json"))
                         if self._valid(i)]  # fmt: skip
        added = self._tok.get_added_tokens_decoder()
        self.special_ids: dict[str, int] = {t.content: i for i, t in added.items() if t.special}
        # the chat template's <s> / </s> are the model's own bos / eos, whatever their names:
        # `encode` maps these aliases itself where the template puts them (`_ALIAS_AT`; the
        # tokenizers library knows only the real names); a literal "<s>" elsewhere is text, as
        # in transformers (a model without a BOS, e.g. Qwen2: `<s>` stands for no token at all)
        self._alias: dict[str, list[int]] = {}
        for name, kind in (("<s>", "bos"), ("</s>", "eos")):
            if name not in self.special_ids and self._ids[kind] >= 0:
                self.special_ids[name] = self._ids[kind]
                self._alias[name] = [self._ids[kind]]
            elif name == "<s>" and name not in self.special_ids and self._ids["eos"] >= 0:
                self._alias[name] = []  # a decoder's tokenizer without a BOS
        self._alias_re = re.compile("(" + "|".join(_ALIAS_AT[n] for n in self._alias) + ")")

    def _valid(self, tid: Any) -> bool:
        return isinstance(tid, int) and 0 <= tid < self._tok.get_vocab_size(with_added_tokens=True)

    def _special_token_ids(self, directory: Path) -> dict[str, int]:
        """bos/eos/pad/unk: named by tokenizer_config.json (a null there: none), else by
        special_tokens_map.json, else generation_config.json's / config.json's `<kind>_token_id`
        (the first of a list); -1 where none names one."""
        names = _read_json(directory / "special_tokens_map.json")
        names.update(_read_json(directory / "tokenizer_config.json"))
        configs = [_read_json(directory / f) for f in ("generation_config.json", "config.json")]
        ids = {}
        for kind in SPECIAL_KINDS:
            if f"{kind}_token" in names:
                ids[kind] = self._id_of(_token_str(names[f"{kind}_token"]))
                continue
            found = (_id_list(c, f"{kind}_token_id") for c in configs)
            ids[kind] = next((i[0] for i in found if i and self._valid(i[0])), -1)
        return ids

    @functools.cached_property
    def _plain(self) -> Any:
        """The same tokenizer reading special-token strings as text (`specials=False`),
        built on first use (two threads may both build it: the same object either way)."""
        from tokenizers import Tokenizer as _Tok

        plain = _Tok.from_str(self._tok.to_str())
        plain.encode_special_tokens = True
        return plain

    def _id_of(self, token: str | None) -> int:
        tid = self._tok.token_to_id(token) if token else None
        return -1 if tid is None else tid

    @classmethod
    def load(cls, path: str | os.PathLike) -> HFTokenizer:
        """Loads a `tokenizer.json`, or `<dir>/tokenizer.json` when given a directory."""
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise JaxllmError(f"{p}: tokenizer.json not found")
        return cls(p)

    def save(self, directory: str | os.PathLike) -> Path:
        """Copies tokenizer.json (and its config files) into `directory`."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for name in HF_TOKENIZER_FILES:
            src = self.path.parent / name
            if src.is_file() and src.resolve() != (out / name).resolve():
                shutil.copyfile(src, out / name)
        return out / "tokenizer.json"

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._ids["bos"]

    @property
    def eos_id(self) -> int:
        return self._ids["eos"]

    @property
    def eos_ids(self) -> list[int]:
        """The ids that end generation: the EOS, then generation_config.json's eos ids."""
        head = [self.eos_id] if self.eos_id >= 0 else []
        return list(dict.fromkeys(head + self._gen_eos))

    @property
    def pad_id(self) -> int:
        return self._ids["pad"]

    @property
    def unk_id(self) -> int:
        return self._ids["unk"]

    def __len__(self) -> int:
        return self.vocab_size

    def id_to_piece(self, token_id: int) -> str:
        piece = self._tok.id_to_token(int(token_id))
        if piece is None:
            raise JaxllmError(
                f"token id {token_id} is out of range for a vocabulary of {len(self)}"
            )
        return piece

    def piece_to_id(self, piece: str) -> int:
        tid = self._tok.token_to_id(piece)
        return self.unk_id if tid is None else tid

    def encode(
        self, text: str, add_bos: bool = False, add_eos: bool = False, specials: bool = True
    ) -> list[int]:
        return self.encode_batch([text], add_bos=add_bos, add_eos=add_eos, specials=specials)[0]

    def encode_batch(
        self,
        texts: Sequence[str],
        add_bos: bool = False,
        add_eos: bool = False,
        num_threads=2,
        specials: bool = True,
    ) -> list[list[int]]:
        """Token ids per text; special-token strings in the text become their ids (and so do
        the `<s>`/`</s>` aliases of bos/eos where jaxllm's chat template puts them: `<s>`
        before a role token, `</s>` after `<|end|>`), or with `specials=False` stay text."""
        if add_bos and self.bos_id < 0 or add_eos and self.eos_id < 0:
            raise JaxllmError(f"{self.path}: add_bos/add_eos asked but the tokenizer has none")
        head = [self.bos_id] if add_bos else []
        tail = [self.eos_id] if add_eos else []
        if not specials or not self._alias:
            tok = self._tok if specials else self._plain
            return [
                head + e.ids + tail for e in tok.encode_batch(list(texts), add_special_tokens=False)
            ]
        parts = [self._alias_re.split(t) for t in texts]  # [text, alias, text, ...]
        segments = [p[i] for p in parts for i in range(0, len(p), 2)]
        encoded = iter(self._tok.encode_batch(segments, add_special_tokens=False))
        out = []
        for p in parts:
            ids = list(head)
            for i, piece in enumerate(p):
                ids.extend(self._alias[piece] if i % 2 else next(encoded).ids)
            out.append(ids + tail)
        return out

    def decode(self, ids: Sequence[int] | Any, skip_special: bool = False) -> str:
        return self.decode_batch([ids], skip_special=skip_special)[0]

    def decode_batch(self, batch: Any, skip_special: bool = False, num_threads=2) -> list[str]:
        rows = [ids.tolist() if hasattr(ids, "tolist") else list(ids) for ids in batch]
        return self._tok.decode_batch(rows, skip_special_tokens=skip_special)


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file's content; {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise JaxllmError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise JaxllmError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _id_list(conf: dict[str, Any], key: str = "eos_token_id") -> list[Any]:
    """A config's token id(s) under `key` as a list (HF writes an int or a list)."""
    value = conf.get(key)
    return value if isinstance(value, list) else [] if value is None else [value]


def load_tokenizer(path: str | os.PathLike) -> Any:
    """A sentencepiece `Tokenizer` for a `.model` file (or a dir holding tokenizer.model); for
    a `tokenizer.json` file (or a dir holding one) a `WordPieceTokenizer` when it holds a
    WordPiece model, else an `HFTokenizer`."""
    from jaxllm.tokenizer import Tokenizer
    from jaxllm.tokenizer.wordpiece import WordPieceTokenizer, is_wordpiece

    p = Path(path).expanduser()
    has_sp = p.is_dir() and (p / "tokenizer.model").is_file()
    has_json = p.suffix == ".json" or (p.is_dir() and (p / "tokenizer.json").is_file())
    if not has_json or has_sp:
        return Tokenizer.load(p)
    file = p / "tokenizer.json" if p.is_dir() else p
    return WordPieceTokenizer.load(p) if is_wordpiece(file) else HFTokenizer.load(p)


def add_special_tokens(path: str | os.PathLike, tokens: Sequence[str]) -> int:
    """Adds the `tokens` a `tokenizer.json` lacks as special tokens (new ids after the last
    one), rewriting the file in place; returns how many were added."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as _Tok

    p = Path(path)
    tok = _Tok.from_file(str(p))
    missing = [t for t in tokens if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        tok.save(str(p))
    return len(missing)
