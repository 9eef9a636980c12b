"""A jaxllm sentencepiece model → a HF `tokenizer.json` + `tokenizer_config.json` that give the
same ids as `Tokenizer.encode` and the same text as `decode`, for `transformers`' AutoTokenizer.

jaxllm trains with identity (or NFKC) normalisation, no dummy prefix and no whitespace
splitting at encode time, so the HF pipeline is: the model's precompiled normaliser (when it
has one), `" "` → `"▁"`, then the model over the whole text:

- bpe: the `tokenizers` BPE with sentencepiece's merge order. Sentencepiece merges the
  adjacent pair whose concatenation is the best-scoring piece; its scores fall with the id, so
  every split (a, b) of a learned piece, ranked by the piece's id, is the same rule;
- unigram: the `tokenizers` Unigram (the same Viterbi) over the pieces and their scores;
- char: a BPE with no merges (every character is a piece);
- word: no `tokenizers` model segments whole words with byte fallback, so none is written.

Special pieces (`<pad>`, `<s>`, the chat tokens) are special added tokens, matched in the text
as `encode` matches them; the post-processor puts `<s>` in front, as jaxllm's generate does,
and `tokenizer_config.json` carries the chat template. Two known differences: a literal `▁` in
the text is a space to HF, while jaxllm sends it as its three bytes; the text `<unk>` is the
unk token to `transformers` (it matches every named special token), text to jaxllm. (And for
unigram, a literal `<0x41>` where the model has no piece for `>` is that byte to HF; with
`normalization: nmt_nfkc`, `tokenizers` maps a CRLF to one space where sentencepiece gives two;
and unigram segmentations of exactly equal score, as in runs of one repeated character such as
"!!!!", are broken the other way: other ids, the same text.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sentencepiece import sentencepiece_model_pb2 as model_pb2

from jaxllm.tokenizer.chat import END_TOKEN, ROLE_TOKENS

_WS = "\u2581"
_Piece = model_pb2.ModelProto.SentencePiece
_Type = model_pb2.TrainerSpec
_IN_TEXT = (_Piece.NORMAL, _Piece.USER_DEFINED)  # the piece types sentencepiece matches in text

# The template of `jaxllm.tokenizer.chat` in Jinja (what `apply_chat_template` renders).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles are system, user and assistant') }}{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '" + END_TOKEN + "' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '" + ROLE_TOKENS["assistant"] + "' }}"
    "{% elif messages and messages[-1]['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
)


def convertible(tok: Any) -> str | None:
    """None when `tok` (a jaxllm `Tokenizer`) converts; else why not, in a sentence."""
    if tok.model_type == "WORD":
        return "a word-level sentencepiece model has no tokenizer.json equivalent"
    return None


def write_hf_tokenizer(tok: Any, out_dir: Path, max_len: int = 0) -> list[Path]:
    """Writes `tokenizer.json` and `tokenizer_config.json` for the sentencepiece `Tokenizer`
    `tok` into `out_dir` (`max_len` > 0: the model's context, as `model_max_length`, so
    `truncation=True` cuts there); returns their paths. Raises ValueError when `convertible`
    says no."""
    why = convertible(tok)
    if why:
        raise ValueError(why)
    proto = model_pb2.ModelProto()
    proto.ParseFromString(tok.model_proto)
    hf = _pipeline(proto, tok)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save(str(out_dir / "tokenizer.json"))
    conf: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{
            f"{k}_token": tok.id_to_piece(getattr(tok, f"{k}_id"))
            for k in ("bos", "eos", "pad", "unk")
        },
        "clean_up_tokenization_spaces": False,  # it would eat the space in " ." on decode
    }
    if max_len > 0:
        conf["model_max_length"] = max_len
    if all(t in tok.special_ids for t in (*ROLE_TOKENS.values(), END_TOKEN)):
        conf["chat_template"] = CHAT_TEMPLATE
    (out_dir / "tokenizer_config.json").write_text(json.dumps(conf, indent=1) + "\n")
    return [out_dir / "tokenizer.json", out_dir / "tokenizer_config.json"]


def _pipeline(proto: Any, tok: Any) -> Any:
    from tokenizers import AddedToken, decoders, models, normalizers, processors
    from tokenizers import Tokenizer as HFTok

    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    fallback = proto.trainer_spec.byte_fallback
    if proto.trainer_spec.model_type == _Type.UNIGRAM:
        # sentencepiece's Viterbi never matches byte / control / unknown pieces in the text
        # (`<0x41>` stays 6 characters); HF's matches any piece, so these never win there
        never = min(s for _, s, _ in pieces) - 1e6
        vocab = [(p, s if t in _IN_TEXT else never) for p, s, t in pieces]
        model = models.Unigram(vocab, tok.unk_id, fallback)
    else:
        vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
        merges = _bpe_merges(pieces) if proto.trainer_spec.model_type == _Type.BPE else []
        unk = tok.id_to_piece(tok.unk_id)
        model = models.BPE(vocab, merges, unk_token=unk, byte_fallback=fallback, fuse_unk=True)
    hf = HFTok(model)
    charsmap = proto.normalizer_spec.precompiled_charsmap
    steps = [normalizers.Precompiled(charsmap)] if charsmap else []
    hf.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", _WS)])
    hf.decoder = decoders.Sequence(
        [
            decoders.Replace(tok.id_to_piece(tok.unk_id), " \u2047 "),  # sentencepiece's " ⁇ "
            decoders.Replace(_WS, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
        ]
    )
    special = [p for p, _, t in pieces if t in (_Piece.CONTROL, _Piece.USER_DEFINED)]
    hf.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in special])
    bos = tok.id_to_piece(tok.bos_id)
    hf.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_id)]
    )
    return hf


def _bpe_merges(pieces: list[tuple[str, float, int]]) -> list[tuple[str, str]]:
    """Every split (a, b) of a learned piece into two normal pieces, ranked by the piece's id."""
    normal = {p: i for i, (p, _, t) in enumerate(pieces) if t == _Piece.NORMAL}
    ranked = []
    for piece, i in normal.items():
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in normal and b in normal:
                ranked.append((i, normal[a], normal[b], a, b))
    return [(a, b) for *_, a, b in sorted(ranked)]
