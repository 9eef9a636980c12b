"""WordPiece (BERT's tokenizer) trained and run with the Hugging Face `tokenizers` library.

Layout of every model: `[PAD]`=0, `[UNK]`=1, `[CLS]`=2, `[SEP]`=3, `[MASK]`=4, then
`cfg.special_tokens` from id 5 on, then the learned vocabulary (word starts, and `##`
continuations). Normalisation is BERT's: control characters removed, whitespace folded, every
CJK character split off as a word of its own (one token per Chinese character), optional
lower-casing with accents stripped (`tokenizer.lowercase`). Text then splits on whitespace and
punctuation before WordPiece. So `decode(encode(t))` gives `t` back up to that normalisation
and the spaces between words (`same_text`, tested): WordPiece does not keep whitespace.

Saved as `tokenizer.json` + `tokenizer_config.json` (BERT's keys), which `transformers`'
`BertTokenizerFast` loads too. Sentence pairs: `encode_pair` gives `[CLS] a [SEP] b [SEP]` and
the token-type ids (0 for a, 1 for b).
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.config import TokenizerConfig
from jaxllm.errors import JaxllmError
from jaxllm.tokenizer.hf import HFTokenizer

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4, fixed
PAD, UNK, CLS, SEP, MASK = range(5)


def train_wordpiece(texts: Iterable[str], cfg: TokenizerConfig, out_dir: Path) -> Path:
    """Trains on `texts`; writes `<out_dir>/tokenizer.json` (+ config) and returns its path."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    specials = [*BERT_SPECIALS, *cfg.special_tokens]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    steps = [normalizers.NFKC()] if cfg.normalization == "nfkc" else []
    steps.append(
        normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=cfg.lowercase,
            lowercase=cfg.lowercase,
        )
    )  # fmt: skip
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=cfg.vocab_size, special_tokens=specials, continuing_subword_prefix="##",
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() <= len(specials):
        raise JaxllmError("tokenizer training: the corpus has no text (every line was empty)")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)],
    )  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.json"
    tmp = path.with_name(".tokenizer.json.tmp")
    tok.save(str(tmp))
    tmp.replace(path)
    conf = {
        "tokenizer_class": "BertTokenizerFast", "do_lower_case": cfg.lowercase,
        "tokenize_chinese_chars": True, "strip_accents": cfg.lowercase,
        **{f"{k}_token": t for k, t in zip(("pad", "unk", "cls", "sep", "mask"), BERT_SPECIALS)},
        "model_max_length": 512,
    }  # fmt: skip
    (out_dir / "tokenizer_config.json").write_text(json.dumps(conf, indent=1) + "\n")
    return path


class WordPieceTokenizer(HFTokenizer):
    """A WordPiece `tokenizer.json`; `load` it. `encode` adds no specials (as every jaxllm
    tokenizer); `encode_pair` / `encode_single` give BERT's inputs with `[CLS]`/`[SEP]`."""

    kind = "wordpiece"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        for i, name in enumerate(BERT_SPECIALS):
            if self._tok.token_to_id(name) != i:
                raise JaxllmError(
                    f"{path}: a WordPiece tokenizer for jaxllm needs {name} at id {i} "
                    "(train one with stage: tokenizer, model_type: wordpiece)"
                )
        self._ids.update(pad=PAD, unk=UNK)
        self.lowercase = bool(self._config().get("do_lower_case", False))

    def _config(self) -> dict[str, Any]:
        p = self.path.parent / "tokenizer_config.json"
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}

    cls_id, sep_id, mask_id = CLS, SEP, MASK

    def encode_single(self, text: str, max_len: int = 0) -> list[int]:
        """`[CLS] text [SEP]`, the text cut to fit `max_len` (0: no limit)."""
        ids = self.encode(text)
        if max_len:
            ids = ids[: max(max_len - 2, 0)]
        return [CLS, *ids, SEP]

    def encode_pair(self, a: str, b: str, max_len: int = 0) -> tuple[list[int], list[int]]:
        """(`[CLS] a [SEP] b [SEP]`, token types 0…0 1…1); with `max_len`, the longer of a and
        b loses tokens from its end until the pair fits (BERT's truncation)."""
        return pair_ids(self.encode(a), self.encode(b), max_len)

    def continuation_mask(self) -> np.ndarray:
        """[V] bool: True for `##` pieces, which continue the word before them (whole-word
        masking groups a word start with them; a Chinese character is a word of its own)."""
        vocab = self._tok.get_vocab(with_added_tokens=True)
        out = np.zeros(self.vocab_size, bool)
        out[[i for piece, i in vocab.items() if piece.startswith("##")]] = True
        return out

    def special_mask(self) -> np.ndarray:
        """[V] bool: True for the special tokens (the five BERT ones and any added)."""
        out = np.zeros(self.vocab_size, bool)
        out[[*range(len(BERT_SPECIALS)), *self.special_ids.values()]] = True
        return out

    def same_text(self, decoded: str, text: str) -> bool:
        """Whether `decoded` is `text` up to the normalisation and the spaces between words."""
        return _squash(decoded, False) == _squash(self._tok.normalizer.normalize_str(text), False)


def pair_ids(ia: Sequence[int], ib: Sequence[int], max_len: int = 0) -> tuple[list[int], list[int]]:
    """`[CLS] a [SEP] b [SEP]` of two token lists and the token types (0 for a, 1 for b);
    with `max_len`, BERT's truncation: the longer list loses tokens from its end until the
    pair fits (`encode_pair`, and MLM pairs built from pre-tokenized sentences)."""
    ia, ib = list(ia), list(ib)
    if max_len:
        while len(ia) + len(ib) > max_len - 3 and (ia or ib):
            (ia if len(ia) >= len(ib) else ib).pop()
    ids = [CLS, *ia, SEP, *ib, SEP]
    return ids, [0] * (len(ia) + 2) + [1] * (len(ib) + 1)


def _squash(text: str, lowercase: bool) -> str:
    text = "".join(text.split())
    return unicodedata.normalize("NFC", text.lower() if lowercase else text)


def is_wordpiece(path: Path) -> bool:
    """Whether a `tokenizer.json` holds a WordPiece model."""
    try:
        model = json.loads(path.read_text(encoding="utf-8")).get("model", {})
    except (OSError, ValueError):
        return False
    return isinstance(model, dict) and model.get("type") == "WordPiece"


def batch_encode_pairs(
    tok: WordPieceTokenizer, pairs: Sequence[tuple[str, str]], max_len: int
) -> list[tuple[list[int], list[int]]]:
    return [tok.encode_pair(a, b, max_len) for a, b in pairs]
