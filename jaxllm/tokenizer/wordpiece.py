"""WordPiece (BERT's tokenizer) trained and run with the Hugging Face `tokenizers` library.

Layout of every model jaxllm trains: `[PAD]`=0, `[UNK]`=1, `[CLS]`=2, `[SEP]`=3, `[MASK]`=4,
then `cfg.special_tokens` from id 5 on, then the learned vocabulary (word starts, and `##`
continuations). An imported BERT tokenizer keeps its own ids (Google's vocab.txt has [PAD]=0,
[UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103): `WordPieceTokenizer` reads every special id from
the vocabulary, by the names `tokenizer_config.json` gives, and `wordpiece_from_vocab` builds a
`tokenizer.json` from a `vocab.txt`. Normalisation is BERT's: control characters removed, whitespace folded, every
CJK character split off as a word of its own (one token per Chinese character), optional
lower-casing with accents stripped (`tokenizer.lowercase`). Text then splits on whitespace and
punctuation before WordPiece. So `decode(encode(t))` gives `t` back up to that normalisation
and the spaces between words (`same_text`, tested): WordPiece does not keep whitespace.

Saved as `tokenizer.json` + `tokenizer_config.json` (BERT's keys), which `transformers`'
`BertTokenizerFast` loads too. With `tokenizer.normalization: nfkc` the config names
`PreTrainedTokenizerFast` instead: `BertTokenizerFast` rebuilds its normaliser from the
config's BERT keys and drops the NFKC step, while `PreTrainedTokenizerFast` runs
`tokenizer.json` as saved (the same ids as jaxllm); the slow `BertTokenizer` (`vocab.txt`)
has no NFKC step at all. Sentence pairs: `encode_pair` gives `[CLS] a [SEP] b [SEP]` and the
token-type ids (0 for a, 1 for b).
"""

from __future__ import annotations

import json
import shutil
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.config import TokenizerConfig
from jaxllm.errors import JaxllmError
from jaxllm.tokenizer.hf import HFTokenizer, _token_str

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4 when jaxllm trains
PAD, UNK, CLS, SEP, MASK = range(5)  # a trained tokenizer's ids; read a loaded one's attributes
SPECIAL_KINDS = ("pad", "unk", "cls", "sep", "mask")


def train_wordpiece(texts: Iterable[str], cfg: TokenizerConfig, out_dir: Path) -> Path:
    """Trains on `texts`; writes `<out_dir>/tokenizer.json` (+ config) and returns its path.

    The same texts give the same file, byte for byte. `tokenizers`' trainer alone does not
    (huggingface/tokenizers#1794): it numbers the `##` continuation characters in hash-map order,
    and those ids break ties between equally frequent merges, so runs differ in ids and at times
    in the vocabulary itself. Here every `##c` the corpus needs is numbered up front, in sorted
    order, by handing the trainer them as reserved tokens; the model is then rebuilt from the
    trained vocabulary with only the real specials as added tokens.
    """
    from tokenizers import AddedToken, Tokenizer, models, trainers

    texts = list(texts)
    specials = [*BERT_SPECIALS, *cfg.special_tokens]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    _bert_pipeline(tok, cfg.lowercase, cfg.lowercase, True, cfg.normalization == "nfkc")
    continuations = _continuation_alphabet(tok, texts)
    trainer = trainers.WordPieceTrainer(
        vocab_size=cfg.vocab_size, special_tokens=[*specials, *continuations],
        continuing_subword_prefix="##", show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() <= len(specials) + len(continuations):
        raise JaxllmError("tokenizer training: the corpus has no text (every line was empty)")
    wp = models.WordPiece(tok.get_vocab(with_added_tokens=False), unk_token="[UNK]",
                          continuing_subword_prefix="##", max_input_chars_per_word=100)  # fmt: skip
    tok = Tokenizer(wp)
    _bert_pipeline(tok, cfg.lowercase, cfg.lowercase, True, cfg.normalization == "nfkc")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    _bert_template(tok, "[CLS]", "[SEP]")
    path = _save(tok, out_dir)
    conf = {
        "tokenizer_class": "BertTokenizerFast", "do_lower_case": cfg.lowercase,
        "tokenize_chinese_chars": True, "strip_accents": cfg.lowercase,
        **{f"{k}_token": t for k, t in zip(SPECIAL_KINDS, BERT_SPECIALS)},
        "model_max_length": 512,
    }  # fmt: skip
    conf = transformers_config(conf, cfg.normalization == "nfkc")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(conf, indent=1) + "\n")
    return path


# what transformers needs to run a tokenizer.json as saved: the class that does not rebuild
# the normaliser, and the inputs BERT takes (PreTrainedTokenizerFast's default has no types)
_AS_SAVED = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
}


def transformers_config(conf: dict[str, Any], nfkc: bool) -> dict[str, Any]:
    """`tokenizer_config.json` for transformers: as given (`BertTokenizerFast`, which rebuilds
    BERT's normaliser from `do_lower_case` / `strip_accents` / `tokenize_chinese_chars`) when
    the normaliser is BERT's alone; with an NFKC step (`nfkc`), `PreTrainedTokenizerFast`,
    which runs `tokenizer.json` as saved, its five special tokens named as before."""
    return {**conf, **_AS_SAVED} if nfkc else conf


def has_nfkc(tokenizer_json: dict[str, Any]) -> bool:
    """Whether a parsed `tokenizer.json`'s normaliser has an NFKC step (alone or in a
    Sequence)."""
    norm = tokenizer_json.get("normalizer") or {}
    steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
    return any(isinstance(x, dict) and x.get("type") == "NFKC" for x in steps)


def fix_transformers_config(directory: Path) -> bool:
    """Rewrites `directory/tokenizer_config.json` with `transformers_config` when its
    `tokenizer.json` normalises with NFKC (a tokenizer trained before the config said
    `PreTrainedTokenizerFast`); returns whether the tokenizer has NFKC."""
    tok_json = json.loads((Path(directory) / "tokenizer.json").read_text(encoding="utf-8"))
    if not has_nfkc(tok_json):
        return False
    conf_path = Path(directory) / "tokenizer_config.json"
    conf = json.loads(conf_path.read_text(encoding="utf-8")) if conf_path.is_file() else {}
    fixed = transformers_config(conf, True)
    if fixed != conf:
        conf_path.write_text(json.dumps(fixed, indent=1) + "\n")
    return True


def _continuation_alphabet(tok: Any, texts: Sequence[str]) -> list[str]:
    """`##c` for every character c that follows another inside a pre-tokenized word of
    `texts` (what the trainer would add lazily), sorted. BERT's normaliser turns all whitespace
    into spaces and its pre-tokenizer splits at them, so each distinct space-separated chunk is
    pre-tokenized once."""
    norm, pre = tok.normalizer, tok.pre_tokenizer
    chunks: set[str] = set()
    for text in texts:
        chunks.update(norm.normalize_str(text).split(" "))
    chars = {c for chunk in chunks for word, _ in pre.pre_tokenize_str(chunk) for c in word[1:]}
    return ["##" + c for c in sorted(chars)]


def wordpiece_from_vocab(vocab_file: Path, out_dir: Path) -> Path:
    """A `tokenizer.json` from a BERT `vocab.txt` (one token a line, id = line number; a
    repeated token keeps its last line, as transformers reads it), with BERT's pipeline and
    the options and special-token names of the `tokenizer_config.json` beside it (defaults:
    uncased, [PAD] [UNK] [CLS] [SEP] [MASK]). Writes tokenizer.json, tokenizer_config.json and
    vocab.txt into `out_dir`; returns the tokenizer.json path."""
    from tokenizers import AddedToken, Tokenizer, models

    conf = read_tokenizer_config(vocab_file.parent)
    lines = vocab_file.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    vocab = {token: i for i, token in enumerate(lines)}
    names = special_names(conf)
    missing = [n for n in names.values() if n not in vocab]
    if missing:
        raise JaxllmError(f"{vocab_file}: no special token '{missing[0]}' in the vocabulary")
    wp = models.WordPiece(vocab, unk_token=names["unk"], continuing_subword_prefix="##",
                          max_input_chars_per_word=100)  # fmt: skip
    tok = Tokenizer(wp)
    lower = bool(conf.get("do_lower_case", True))
    _bert_pipeline(tok, lower, conf.get("strip_accents"), conf.get("tokenize_chinese_chars", True))
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names.values()])
    _bert_template(tok, names["cls"], names["sep"])
    path = _save(tok, out_dir)
    keep = {k: v for k, v in conf.items() if k not in ("tokenizer_file", "vocab_file", "backend")}
    out_conf = {**keep, "tokenizer_class": "BertTokenizerFast", "do_lower_case": lower,
                **{f"{k}_token": n for k, n in names.items()}}  # fmt: skip
    (out_dir / "tokenizer_config.json").write_text(json.dumps(out_conf, indent=1) + "\n")
    if vocab_file.resolve() != (out_dir / "vocab.txt").resolve():
        shutil.copyfile(vocab_file, out_dir / "vocab.txt")
    return path


def read_tokenizer_config(directory: Path) -> dict[str, Any]:
    """`tokenizer_config.json` over `special_tokens_map.json` (either may be absent)."""
    conf: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        p = directory / name
        if p.is_file():
            try:
                conf.update(json.loads(p.read_text(encoding="utf-8")))
            except (ValueError, TypeError):
                raise JaxllmError(f"{p}: not a JSON object") from None
    return conf


def special_names(conf: dict[str, Any]) -> dict[str, str]:
    """The names of BERT's five special tokens (pad, unk, cls, sep, mask) a config gives."""
    return {
        k: _token_str(conf.get(f"{k}_token")) or d for k, d in zip(SPECIAL_KINDS, BERT_SPECIALS)
    }


def _bert_pipeline(tok: Any, lower: bool, strip: bool | None, chinese: bool, nfkc=False) -> None:
    """BERT's normaliser (+ NFKC first if asked), pre-tokenizer and `##` decoder."""
    from tokenizers import decoders, normalizers, pre_tokenizers

    steps = [normalizers.NFKC()] if nfkc else []
    steps.append(
        normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=chinese, strip_accents=strip, lowercase=lower
        )
    )
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")


def _bert_template(tok: Any, cls: str, sep: str) -> None:
    """`[CLS] a [SEP]` / `[CLS] a [SEP] b [SEP]` (types 0, then 1), for transformers' use."""
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))],
    )  # fmt: skip


def _save(tok: Any, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.json"
    tmp = path.with_name(".tokenizer.json.tmp")
    tok.save(str(tmp))
    tmp.replace(path)
    return path


class WordPieceTokenizer(HFTokenizer):
    """A WordPiece `tokenizer.json`; `load` it. `encode` adds no specials (as every jaxllm
    tokenizer); `encode_pair` / `encode_single` give BERT's inputs with `[CLS]`/`[SEP]`.
    The special ids (`pad_id`, `unk_id`, `cls_id`, `sep_id`, `mask_id`) are the vocabulary's
    ids of the names `tokenizer_config.json` gives (BERT's defaults when it gives none)."""

    kind = "wordpiece"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._alias = {}  # no chat template here: "<s>" in a text is text, as in BERT's tokenizer
        conf = read_tokenizer_config(path.parent)
        ids = {}
        for kind, name in special_names(conf).items():
            ids[kind] = self._tok.token_to_id(name)
            if ids[kind] is None:
                raise JaxllmError(
                    f"{path}: the vocabulary has no {kind} token '{name}' (a BERT tokenizer "
                    "needs [PAD] [UNK] [CLS] [SEP] [MASK], or the names tokenizer_config.json gives)"
                )
        self._ids.update(pad=ids["pad"], unk=ids["unk"])
        self.cls_id, self.sep_id, self.mask_id = ids["cls"], ids["sep"], ids["mask"]
        self.lowercase = bool(conf.get("do_lower_case", False))

    def save_vocab(self, directory: Path) -> Path:
        """Writes `vocab.txt` (one token a line in id order) for BERT's slow tokenizer; an id
        no token has (a repeated line of the original) gets a placeholder, keeping ids. The
        slow tokenizer runs BERT's normaliser only: an NFKC step is not in vocab.txt."""
        by_id = {i: t for t, i in self._tok.get_vocab(with_added_tokens=True).items()}
        lines = [by_id.get(i, f"[unused_id_{i}]") for i in range(max(by_id) + 1)]
        path = Path(directory) / "vocab.txt"
        path.write_text("".join(t + "\n" for t in lines), encoding="utf-8")
        return path

    def encode_single(self, text: str, max_len: int = 0) -> list[int]:
        """`[CLS] text [SEP]`, the text cut to fit `max_len` (0: no limit)."""
        ids = self.encode(text)
        if max_len:
            ids = ids[: max(max_len - 2, 0)]
        return [self.cls_id, *ids, self.sep_id]

    def encode_pair(self, a: str, b: str, max_len: int = 0) -> tuple[list[int], list[int]]:
        """(`[CLS] a [SEP] b [SEP]`, token types 0…0 1…1); with `max_len`, the longer of a and
        b loses tokens from its end until the pair fits (BERT's truncation)."""
        return pair_ids(self.encode(a), self.encode(b), max_len, self.cls_id, self.sep_id)

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
        five = [self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id]
        out[[*five, *self.special_ids.values()]] = True
        return out

    def same_text(self, decoded: str, text: str) -> bool:
        """Whether `decoded` is `text` up to the normalisation and the spaces between words."""
        return _squash(decoded, False) == _squash(self._tok.normalizer.normalize_str(text), False)


def pair_ids(
    ia: Sequence[int], ib: Sequence[int], max_len: int = 0, cls: int = CLS, sep: int = SEP
) -> tuple[list[int], list[int]]:
    """`[CLS] a [SEP] b [SEP]` of two token lists and the token types (0 for a, 1 for b);
    with `max_len`, BERT's truncation (`_truncate_seq_pair`): the longer list loses a token
    from its end, `b` on a tie, until the pair fits (`encode_pair`, and MLM pairs built from
    pre-tokenized sentences). `cls`,
    `sep`: the tokenizer's ids (`cls_id`, `sep_id`; 2 and 3 when jaxllm trained it)."""
    ia, ib = list(ia), list(ib)
    if max_len:
        while len(ia) + len(ib) > max_len - 3 and (ia or ib):
            (ia if len(ia) > len(ib) else ib).pop()
    ids = [cls, *ia, sep, *ib, sep]
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
