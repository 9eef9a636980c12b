"""Config sections for data curation, the tokenizer and the grain loader."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from jaxllm.config.checks import at_least


@dataclass(frozen=True)
class SourceConfig:
    """One input corpus: a JSONL or plain-text file (gzip ok), or a glob of them."""

    path: str
    name: str = ""  # report/source name; defaults to the file name without extensions
    weight: float = 1.0  # mixing weight: 2.0 doubles the source, 0.5 keeps a seeded half
    format: Literal["auto", "jsonl", "text"] = "auto"  # auto: by extension (.jsonl[.gz] vs other)
    text_key: str = "text"

    def _validate(self) -> None:
        if not self.path:
            raise ValueError("path: must not be empty")
        if not 0 <= self.weight <= 1000:
            raise ValueError(f"weight: must be in [0, 1000], got {self.weight}")


@dataclass(frozen=True)
class FilterConfig:
    """Document quality filters; each one is off at its permissive default."""

    min_chars: int = 1
    max_chars: int = 10_000_000
    max_non_letter_frac: float = 1.0  # non-letters / non-whitespace characters
    max_repeated_line_frac: float = 1.0  # share of non-empty lines that repeat an earlier line
    top_ngram_n: int = 2  # word n-gram size (characters for text without spaces, e.g. Chinese)
    max_top_ngram_frac: float = 1.0  # share of n-grams taken by the most frequent (if it repeats)
    scripts: tuple[str, ...] = ()  # keep documents whose dominant script is listed: latin, han, ...
    min_script_frac: float = 0.0  # ...and whose letters are at least this share in those scripts

    def _validate(self) -> None:
        if self.min_chars < 0 or self.max_chars < self.min_chars:
            raise ValueError("min_chars: need 0 <= min_chars <= max_chars")
        for k in ("max_non_letter_frac", "max_repeated_line_frac", "max_top_ngram_frac"):
            v = getattr(self, k)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{k}: must be in [0, 1], got {v}")
        if self.top_ngram_n < 1:
            raise ValueError(f"top_ngram_n: must be >= 1, got {self.top_ngram_n}")
        if not 0.0 <= self.min_script_frac <= 1.0:
            raise ValueError(f"min_script_frac: must be in [0, 1], got {self.min_script_frac}")


@dataclass(frozen=True)
class DedupConfig:
    """Exact (hash of normalised text) and near (MinHash + LSH) deduplication."""

    exact: bool = True
    near: bool = True
    threshold: float = 0.8  # Jaccard similarity of shingle sets above which a document is a dup
    num_perm: int = 128  # MinHash permutations
    shingle: int = 5  # character n-gram size of the shingles

    def _validate(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold: must be in (0, 1], got {self.threshold}")
        if self.num_perm < 2:
            raise ValueError(f"num_perm: must be >= 2, got {self.num_perm}")
        if self.shingle < 1:
            raise ValueError(f"shingle: must be >= 1, got {self.shingle}")


@dataclass(frozen=True)
class DataConfig:
    """`stage: data` — curation: read, mix, normalise, filter, dedup, split, write shards."""

    sources: tuple[SourceConfig, ...] = ()
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    normalize: bool = True  # Unicode NFC, \r\n → \n, trailing spaces, runs of blank lines
    val_fraction: float = 0.01  # share of documents in the validation split (hash of text + seed)
    shard_docs: int = 50_000  # documents per output JSONL shard
    on_error: Literal["skip", "fail"] = "skip"

    def _validate(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: must be in [0, 1), got {self.val_fraction}")
        if self.shard_docs < 1:
            raise ValueError(f"shard_docs: must be >= 1, got {self.shard_docs}")


CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<think>", "</think>")


@dataclass(frozen=True)
class TokenizerConfig:
    """`stage: tokenizer` — train a sentencepiece (or WordPiece) model into the run directory;
    later stages load it through `inputs.tokenizer`."""

    # bpe/unigram/char/word: sentencepiece (decoders); wordpiece: BERT's, via HF tokenizers
    # (encoders; byte_fallback, character_coverage and max_sentence_length are sentencepiece's)
    model_type: Literal["bpe", "unigram", "char", "word", "wordpiece"] = "bpe"
    vocab_size: int = 8000
    character_coverage: float = 0.9995  # < 1 sends rare characters to byte fallback / <unk>
    byte_fallback: bool = True
    normalization: Literal["identity", "nfkc", "nmt_nfkc"] = "identity"  # identity round-trips
    special_tokens: tuple[str, ...] = CHAT_TOKENS  # reserved after <pad> <unk> <s> </s>
    max_train_chars: int = 50_000_000  # cap on the text fed to the trainer (seeded sample)
    max_sentence_length: int = 16_384  # longest training line in bytes (longer lines are split)
    num_threads: int = 2
    path: str = ""  # no effect, kept so older run configs load (load_config refuses a value)
    lowercase: bool = False  # wordpiece: lower-case and strip accents (BERT "uncased")

    def _validate(self) -> None:
        at_least(self, 1, "max_train_chars")
        # a piece of a split line holds one UTF-8 character (up to 4 bytes) at least
        at_least(self, 4, "max_sentence_length", note=" (bytes)")
        if not 1 <= self.num_threads <= 1024:  # sentencepiece's trainer range
            raise ValueError(f"num_threads: must be in [1, 1024], got {self.num_threads}")
        if self.model_type == "wordpiece":
            if self.normalization == "nmt_nfkc":
                raise ValueError("normalization: wordpiece takes identity or nfkc")
            least = 5 + len(self.special_tokens) + 1  # [PAD] [UNK] [CLS] [SEP] [MASK], specials
            if self.vocab_size < least:
                raise ValueError(f"vocab_size: must be >= {least}, got {self.vocab_size}")
            return
        if self.lowercase:
            raise ValueError("lowercase: is a wordpiece option (sentencepiece: normalization)")
        # reserved ids, the specials, the 256 byte pieces (with byte fallback), one more piece
        least = 4 + len(self.special_tokens) + (256 if self.byte_fallback else 0) + 1
        if self.vocab_size < least:
            raise ValueError(
                f"vocab_size: must be >= {least} with these options, got {self.vocab_size}"
            )
        if not 0.98 <= self.character_coverage <= 1.0:
            raise ValueError(
                f"character_coverage: must be in [0.98, 1] (sentencepiece), got {self.character_coverage}"
            )


@dataclass(frozen=True)
class LoaderConfig:
    """The grain pipeline from cleaned JSONL to packed, batched training sequences."""

    seq_len: int = 256
    batch_size: int = 16  # global batch, split across processes
    shuffle: bool = True
    num_threads: int = 2  # grain read threads
    prefetch: int = 2  # batches prefetched

    def _validate(self) -> None:
        if self.seq_len < 2:
            raise ValueError(f"seq_len: must be >= 2, got {self.seq_len}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        at_least(self, 0, "num_threads", note=" (0: read in the calling thread)")
        at_least(self, 0, "prefetch", note=" (0: none)")
