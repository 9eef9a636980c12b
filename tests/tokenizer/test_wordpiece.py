"""WordPiece (BERT) tokenizer: fixed special ids, one token per Chinese character, round trips
up to its normalisation, sentence pairs with token types and BERT's truncation, and the same
ids from transformers' BertTokenizerFast loading the saved files."""

import json
import re

import pytest

from jaxllm.config import TokenizerConfig, from_dict
from jaxllm.errors import ConfigError, JaxllmError
from jaxllm.tokenizer.hf import load_tokenizer
from jaxllm.tokenizer.wordpiece import (
    BERT_SPECIALS,
    WordPieceTokenizer,
    pair_ids,
    train_wordpiece,
)
from tests.sft.conftest import SFT_TRAIN

TEXTS = [json.loads(x)["prompt"] + " " + json.loads(x)["response"]
         for x in SFT_TRAIN.read_text(encoding="utf-8").splitlines()]  # fmt: skip


@pytest.fixture(scope="module")
def wp(tmp_path_factory):
    cfg = TokenizerConfig(model_type="wordpiece", vocab_size=3000)
    path = train_wordpiece(TEXTS[:1500], cfg, tmp_path_factory.mktemp("wp"))
    return load_tokenizer(path)


def test_specials_have_fixed_ids_and_chat_tokens_follow(wp):
    assert isinstance(wp, WordPieceTokenizer)
    assert [wp.piece_to_id(t) for t in BERT_SPECIALS] == [0, 1, 2, 3, 4]
    assert wp.piece_to_id("<|system|>") == 5 and wp.pad_id == 0 and wp.unk_id == 1
    assert wp.vocab_size <= 3000


def test_training_is_repeatable_and_keeps_the_trainers_vocabulary(wp, tmp_path):
    """`tokenizers`' trainer numbers `##c` in hash-map order (a different file almost every
    time); ours gives the same bytes, with the `##c` ids in sorted order, and the same kind of
    vocabulary: a `##c` for exactly the characters that follow another inside a word."""
    cfg = TokenizerConfig(model_type="wordpiece", vocab_size=3000)
    again = [train_wordpiece(TEXTS[:1500], cfg, tmp_path / str(i)).read_bytes() for i in range(3)]
    assert again[0] == again[1] == again[2] == wp.path.read_bytes()
    vocab = json.loads(again[0])["model"]["vocab"]
    cont = sorted((t for t in vocab if t.startswith("##") and len(t) == 3), key=vocab.get)
    assert cont == sorted(cont) and len(cont) > 20
    words = re.findall(r"[A-Za-z0-9]+", " ".join(TEXTS[:1500]))  # the ASCII words' letters
    assert {"##" + c for w in words for c in w[1:]} <= set(cont)
    assert "##" + "除" not in vocab  # a Chinese character is a word of its own: never continues


def test_chinese_characters_are_single_tokens_and_round_trips(wp):
    text = "除夕夜应该吃什么呢？"
    pieces = [wp.id_to_piece(i) for i in wp.encode(text)]
    assert pieces == list(text)  # every character its own token (all seen in training)
    held_out = TEXTS[1500:1700]
    known = [t for t in held_out if wp.unk_id not in wp.encode(t)]  # unseen characters: [UNK]
    assert len(known) >= 0.7 * len(held_out)  # rare classical characters are [UNK]
    for t in known:
        assert wp.same_text(wp.decode(wp.encode(t)), t), t
    assert not wp.same_text("something else", held_out[0])


def test_pairs_token_types_and_truncation(wp):
    ids, types = wp.encode_pair("Hello world", "再见")
    a, b = wp.encode("Hello world"), wp.encode("再见")
    assert ids == [2, *a, 3, *b, 3]
    assert types == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    long_a = "one two three four five six seven eight nine ten"
    ids, types = wp.encode_pair(long_a, "再见", max_len=9)
    # BERT's rule: drop from the longer side until the pair fits (9 - 3 specials = 6 tokens)
    assert ids == [2, *wp.encode(long_a)[:4], 3, *wp.encode("再见"), 3]
    assert types == [0] * 6 + [1] * 3
    assert wp.encode_single("再见", max_len=3) == [2, wp.encode("再见")[0], 3]


def test_pair_truncation_is_bert_truncate_seq_pair():
    def reference(a, b, room):  # google-research/bert's _truncate_seq_pair, written out
        a, b = list(a), list(b)
        while len(a) + len(b) > room:
            (a if len(a) > len(b) else b).pop()
        return a, b

    for la in range(6):
        for lb in range(6):
            for max_len in range(3, 12):
                a, b = list(range(10, 10 + la)), list(range(50, 50 + lb))
                ids, _ = pair_ids(a, b, max_len)
                ra, rb = reference(a, b, max_len - 3)
                assert ids == [2, *ra, 3, *rb, 3], (la, lb, max_len)
    assert pair_ids([10, 11], [50], 4)[0] == [2, 10, 3, 3]  # a tie: b loses its token


def test_a_literal_s_tag_is_text(wp):
    assert wp.encode("好 <s> 差") == [*wp.encode("好"), *wp.encode("<s>"), *wp.encode("差")]
    assert len(wp.encode("<s>")) == 3  # < s > (a decoder's BOS alias does not apply here)


def test_transformers_bert_tokenizer_reads_the_files(wp):
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertTokenizerFast.from_pretrained(str(wp.path.parent))
    enc = hf("Hello world", "再见")
    assert enc["input_ids"] == wp.encode_pair("Hello world", "再见")[0]
    assert enc["token_type_ids"] == wp.encode_pair("Hello world", "再见")[1]


def test_wordpiece_config_checks():
    with pytest.raises(ConfigError, match="lowercase.: is a wordpiece option"):
        from_dict({"stage": "tokenizer", "tokenizer": {"lowercase": True}})
    with pytest.raises(ConfigError, match="wordpiece takes identity or nfkc"):
        from_dict({"stage": "tokenizer", "tokenizer": {"model_type": "wordpiece",
                                                      "normalization": "nmt_nfkc"}})  # fmt: skip


def test_tokenizer_stage_trains_wordpiece(tmp_path):
    from jaxllm.main import main
    from tests.sft.conftest import ROOT

    data = tmp_path / "data"
    for split, texts in (("train", TEXTS[:1500]), ("val", TEXTS[1500:1600])):
        (data / split).mkdir(parents=True)
        rows = "".join(
            json.dumps({"text": t, "source": "sft"}, ensure_ascii=False) + "\n" for t in texts
        )
        (data / split / "shard-00000.jsonl").write_text(rows, encoding="utf-8")
    out = tmp_path / "wp"
    args = ["--config", str(ROOT / "configs/tiny_wordpiece.yaml"), "--set", f"output_dir={out}",
            "--set", f"inputs.data_dir={data}", "--set", "tokenizer.vocab_size=3000"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model_type"] == "wordpiece" and summary["vocab_size"] <= 3000
    n, total = map(int, summary["round_trip_exact"].split("/"))
    assert total == 100 and n >= 70 and summary["tokens_per_char"]["sft"] > 0
    tok = load_tokenizer(summary["outputs"]["tokenizer"])
    assert isinstance(tok, WordPieceTokenizer) and tok.piece_to_id("<|user|>") == tok.unk_id


def test_tokenizer_from_a_bert_vocab_keeps_its_special_ids(tmp_path):
    """A vocab.txt laid out like Google's ([UNK] [CLS] [SEP] [MASK] not at 1-4) keeps its ids;
    tokenizer_config.json picks casing and may rename the special tokens."""
    from jaxllm.tokenizer.wordpiece import wordpiece_from_vocab

    vocab = ["<pad>", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "Hello",
             "world", "##s", ","]  # fmt: skip
    src = tmp_path / "src"
    src.mkdir()
    (src / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (src / "tokenizer_config.json").write_text('{"do_lower_case": false, "pad_token": "<pad>"}')
    tok = load_tokenizer(wordpiece_from_vocab(src / "vocab.txt", tmp_path / "tok"))
    assert isinstance(tok, WordPieceTokenizer) and tok.vocab_size == len(vocab)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 2, 3, 4, 5)
    assert tok.encode_single("Hello worlds, hello!") == [3, 7, 8, 9, 10, 6, 2, 4]  # cased
    assert tok.encode_pair("hello", "world") == ([3, 6, 4, 8, 4], [0, 0, 0, 1, 1])
    assert tok.decode(tok.encode_single("hello [MASK]"), skip_special=True) == "hello"
    tok.save_vocab(tmp_path)
    assert (tmp_path / "vocab.txt").read_text().splitlines() == vocab
    (src / "tokenizer_config.json").write_text('{"pad_token": "<pad>", "mask_token": "<mask>"}')
    with pytest.raises(JaxllmError, match="vocab.txt: no special token '<mask>'"):
        wordpiece_from_vocab(src / "vocab.txt", tmp_path / "bad")


NFKC_TEXTS = ["ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３ and ﬁne ½", "™ ㎏ Ⅻ ① café", "好吃，不贵！"]


def test_an_nfkc_wordpiece_gives_jaxllms_ids_in_transformers(tmp_path):
    """`normalization: nfkc`: AutoTokenizer on the saved files runs tokenizer.json as saved
    (BertTokenizerFast rebuilt BERT's normaliser from the config and dropped NFKC), pairs with
    token types, the five special tokens named; an identity model keeps BertTokenizerFast; an
    nfkc tokenizer saved before (BertTokenizerFast in its config) is fixed on export."""
    import unicodedata

    from jaxllm.tokenizer.wordpiece import fix_transformers_config

    transformers = pytest.importorskip("transformers")
    cfg = TokenizerConfig(model_type="wordpiece", vocab_size=600, normalization="nfkc",
                          lowercase=True)  # fmt: skip
    path = train_wordpiece([*TEXTS[:120], *NFKC_TEXTS], cfg, tmp_path / "nfkc")
    ours = load_tokenizer(path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "nfkc"))
    for text in [*NFKC_TEXTS, *TEXTS[300:330]]:
        assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
        # NFKC is applied first: the text as the unicode module normalises it, the same ids
        assert ours.encode(unicodedata.normalize("NFKC", text)) == ours.encode(text)
    assert hf("ｆｕｌｌ ＡＢＣ")["input_ids"] == ours.encode_single("full abc")  # lowercased too
    enc = hf("ｆｕｌｌ ＡＢＣ", "１２３")
    assert (enc["input_ids"], enc["token_type_ids"]) == ours.encode_pair(
        "ｆｕｌｌ ＡＢＣ", "１２３"
    )
    names = [hf.pad_token, hf.unk_token, hf.cls_token, hf.sep_token, hf.mask_token]
    assert names == list(BERT_SPECIALS) and hf.mask_token_id == ours.mask_id
    # identity: unchanged, BertTokenizerFast from BERT's keys
    plain = train_wordpiece(TEXTS[:50], replace_norm(cfg, "identity"), tmp_path / "plain")
    conf = json.loads((plain.parent / "tokenizer_config.json").read_text())
    assert conf["tokenizer_class"] == "BertTokenizerFast" and "model_input_names" not in conf
    assert not fix_transformers_config(plain.parent)
    # an nfkc tokenizer saved with the old config: export rewrites it
    conf_path = tmp_path / "nfkc" / "tokenizer_config.json"
    old = {k: v for k, v in json.loads(conf_path.read_text()).items() if k != "model_input_names"}
    conf_path.write_text(json.dumps({**old, "tokenizer_class": "BertTokenizerFast"}))
    assert fix_transformers_config(tmp_path / "nfkc")
    assert json.loads(conf_path.read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


def replace_norm(cfg: TokenizerConfig, normalization: str) -> TokenizerConfig:
    from jaxllm.config import replace

    return replace(cfg, normalization=normalization)
