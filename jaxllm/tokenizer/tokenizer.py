"""`Tokenizer`: a sentencepiece model plus HF-style special tokens and exact round trips.

Special tokens (control and user-defined pieces: `<pad>`, `<s>`, `</s>`, the chat tokens) are
matched in the text by one regex and mapped to their ids; the text between them goes through
sentencepiece, all segments of a batch in one multi-threaded call. Decoding renders special ids
as their strings and decodes the runs between them, so `decode(encode(t)) == t` for any text
with a byte-fallback model trained with identity normalisation.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from jaxllm.errors import JaxllmError

MODEL_FILENAME = "tokenizer.model"  # the name `save` writes and `load(<dir>)` reads

_WS = "\u2581"  # sentencepiece's whitespace symbol "▁"
_WS_BYTES = _WS.encode("utf-8")
# A list call to sentencepiece starts its threads (about 60 us a call); below this many items
# one call per item is faster (a chat render encodes a few pieces: 5-9x faster this way).
_THREADED_FROM = 64
_SPECIAL_TYPES = {
    model_pb2.ModelProto.SentencePiece.CONTROL,
    model_pb2.ModelProto.SentencePiece.USER_DEFINED,
}


class Tokenizer:
    """A loaded sentencepiece model; build it with `Tokenizer.load(path)`."""

    def __init__(self, model_proto: bytes, path: Path | None = None) -> None:
        proto = model_pb2.ModelProto()
        proto.ParseFromString(model_proto)  # raises DecodeError on junk
        self._proto = model_proto
        self.path = path
        self.model_type = model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        pieces = proto.pieces
        special = [i for i, p in enumerate(pieces) if p.type in _SPECIAL_TYPES]
        special = sorted([*special, self.unk_id] if self.unk_id >= 0 else special)
        self.special_ids: dict[str, int] = {pieces[i].piece: i for i in special}
        # Ids rendered as their own string; <unk> is left to sentencepiece (" ⁇ ").
        self._render = {i: s for s, i in self.special_ids.items() if i != self.unk_id}
        self._byte_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
        self._byte_fallback = proto.trainer_spec.byte_fallback
        self._literal: dict[str, list[int]] = {s: [i] for i, s in self._render.items()}
        if self._byte_fallback:
            # A literal "▁" in the text would decode as a space: send it as its three bytes.
            self._literal[_WS] = [self._byte_ids[b] for b in _WS_BYTES]
        self._pattern = re.compile(
            "(" + "|".join(re.escape(s) for s in sorted(self._literal, key=len, reverse=True)) + ")"
        )

    # ------------------------------------------------------------------------- loading

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads a `.model` file, or `<dir>/tokenizer.model` when given a directory."""
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / MODEL_FILENAME
        if not p.is_file():
            raise JaxllmError(f"{p}: tokenizer model not found (train one with stage: tokenizer)")
        try:
            return cls(p.read_bytes(), path=p)
        except (DecodeError, RuntimeError, OSError, ValueError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise JaxllmError(f"{p}: not a valid sentencepiece model ({reason})") from None

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes the model as `<directory>/tokenizer.model` (atomically); returns its path."""
        out = Path(directory) / MODEL_FILENAME
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        try:
            tmp.write_bytes(self._proto)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        return out

    @property
    def model_proto(self) -> bytes:
        """The serialised sentencepiece model (what `save` writes)."""
        return self._proto

    # ------------------------------------------------------------------------- vocabulary

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def id_to_piece(self, token_id: int) -> str:
        self._check_ids([int(token_id)])
        return self._sp.id_to_piece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        """The id of a vocabulary piece (`unk_id` when there is none)."""
        return self._sp.piece_to_id(piece)

    def is_byte(self, token_id: int) -> bool:
        """Whether `token_id` is a byte-fallback piece such as `<0xE9>`."""
        return self._sp.is_byte(int(token_id))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        where = f", path='{self.path}'" if self.path else ""
        return (
            f"Tokenizer(type={self.model_type.lower()}, vocab_size={self.vocab_size}, "
            f"specials={len(self.special_ids)}, byte_fallback={self._byte_fallback}{where})"
        )

    # ------------------------------------------------------------------------- encoding

    def encode(
        self, text: str, add_bos: bool = False, add_eos: bool = False, specials: bool = True
    ) -> list[int]:
        """Token ids of `text`; special-token strings in it become their ids (with
        `specials=False` they are text like any other: a document's `<s>` HTML tag)."""
        return self.encode_batch(
            [text], add_bos=add_bos, add_eos=add_eos, num_threads=1, specials=specials
        )[0]

    def encode_batch(
        self,
        texts: Sequence[str],
        add_bos: bool = False,
        add_eos: bool = False,
        num_threads: int = 2,
        specials: bool = True,
    ) -> list[list[int]]:
        """`encode` for many texts: every plain segment goes into one threaded sentencepiece call."""
        split = self._pattern.split
        items = []  # per text: text segments (str) and literal ids (list), in order
        for t in texts:
            row: list[str | list[int]] = []
            for i, piece in enumerate(split(t)):  # [segment, literal, segment, ..., segment]
                if not i % 2:
                    row.extend([piece] if piece else [])
                elif specials or piece == _WS:
                    row.append(self._literal[piece])
                else:  # as text, cut after its first character so no special piece matches
                    row.extend([piece[:1], piece[1:]])
            items.append(row)
        segments = [x for row in items for x in row if isinstance(x, str)]
        encoded = _each_or_threaded(self._sp.encode, segments, num_threads)
        if self._byte_fallback:
            encoded = [self._space_bytes(ids) for ids in encoded]
        encoded = iter(encoded)
        out = []
        for row in items:
            ids = [self.bos_id] if add_bos else []
            for x in row:
                ids.extend(next(encoded) if isinstance(x, str) else x)
            if add_eos:
                ids.append(self.eos_id)
            out.append(ids)
        return out

    def _space_bytes(self, ids: list[int]) -> list[int]:
        """Swaps each `E2 96 81` byte run in sentencepiece's output for the byte `0x20`.

        Sentencepiece byte-encodes a space it has no piece for (a model without a "▁" piece, a
        word model's unseen "▁word") as the bytes of "▁", which decode as a literal "▁". Literal
        "▁"s never reach sentencepiece (`encode` sends them as bytes itself), so these bytes are
        always such a space; `E2` only ever starts a character, so the match is exact."""
        e2, b96, b81 = (self._byte_ids[b] for b in _WS_BYTES)
        if e2 not in ids:
            return ids
        out: list[int] = []
        i = 0
        while i < len(ids):
            if ids[i] == e2 and ids[i + 1 : i + 3] == [b96, b81]:
                out.append(self._byte_ids[0x20])
                i += 3
            else:
                out.append(ids[i])
                i += 1
        return out

    # ------------------------------------------------------------------------- decoding

    def decode(self, ids: Sequence[int] | Any, skip_special: bool = False) -> str:
        """Text of `ids`: special ids as their strings (dropped with `skip_special`)."""
        return self.decode_batch([ids], skip_special=skip_special, num_threads=1)[0]

    def decode_batch(
        self, batch: Sequence[Sequence[int]] | Any, skip_special: bool = False, num_threads: int = 2
    ) -> list[str]:
        """`decode` for many id sequences (lists or numpy arrays), in one sentencepiece call."""
        render = self._render
        runs: list[list[int]] = []
        plans: list[list[int | str]] = []  # per sequence: run indices and rendered specials
        for ids in batch:
            ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
            plan: list[int | str] = []
            start = 0
            for j, token in enumerate(ids):
                if token in render:
                    if j > start:
                        plan.append(len(runs))
                        runs.append(ids[start:j])
                    if not skip_special:
                        plan.append(render[token])
                    start = j + 1
            if len(ids) > start:
                plan.append(len(runs))
                runs.append(ids[start:])
            plans.append(plan)
        try:
            texts = _each_or_threaded(self._sp.decode, runs, num_threads)
        except IndexError:
            self._check_ids(token for run in runs for token in run)
            raise
        return ["".join(texts[p] if isinstance(p, int) else p for p in plan) for plan in plans]

    def _check_ids(self, ids: Any) -> None:
        n = self.vocab_size
        bad = next((i for i in ids if not 0 <= i < n), None)
        if bad is not None:
            raise JaxllmError(f"token id {bad} is out of range for a vocabulary of {n}")


def _each_or_threaded(fn: Callable, items: list, num_threads: int) -> list:
    """`fn(items, num_threads=...)` (sentencepiece's threaded list call) for many items, one
    `fn(item)` each for fewer than `_THREADED_FROM` (or one thread): the same results."""
    if num_threads <= 1 or len(items) < _THREADED_FROM:
        return [fn(x) for x in items]
    return fn(items, num_threads=num_threads)
