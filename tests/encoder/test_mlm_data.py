"""MLM/NSP pairs: sentence splitting, masking proportions (15 % chosen, 80/10/10) and whole
words, NSP labels 50/50 with negatives from other documents of the process's own slice,
and a grain pipeline that is deterministic and resumes to identical batches."""

import json

import numpy as np
import pytest

from jaxllm.config import LoaderConfig, MLMConfig
from jaxllm.data.mlm import (
    IS_NEXT,
    IS_RANDOM,
    choose_masks,
    document_chunks,
    document_pairs,
    make_mlm_dataset,
    make_mlm_eval_dataset,
    max_predictions,
    split_sentences,
)
from jaxllm.data.pipeline import find_shards
from jaxllm.errors import DataError
from jaxllm.tokenizer.wordpiece import CLS, MASK, SEP

from .conftest import MARKERS, marker_doc, write_split

LOADER = LoaderConfig(seq_len=64, batch_size=8, num_threads=2, prefetch=0)


def test_sentences_split_on_english_and_chinese_marks_and_lines():
    text = '<s>He came. "Go!" she said. Why? ok\n第一句。“第二句！”第三句？\n\nlast line</s>'
    assert split_sentences(text) == [
        "He came.", '"Go!"', "she said.", "Why?", "ok",
        "第一句。", "“第二句！”", "第三句？", "last line",
    ]  # fmt: skip
    assert split_sentences("e.g.no space stays one") == ["e.g.no space stays one"]
    assert split_sentences("<s>  </s>") == []


def test_masking_proportions_match_bert_on_many_rows():
    rng = np.random.default_rng(0)
    special_V = np.zeros(1000, bool)
    special_V[:5] = True
    chosen = candidates = 0
    kinds = np.zeros(3)  # [MASK], random, kept
    for _ in range(400):
        ids = [CLS, *rng.integers(5, 1000, 60), SEP, *rng.integers(5, 1000, 40), SEP]
        out, pos, tgt = choose_masks(ids, rng, mask_prob=0.15, max_predictions=20,
                                     special_V=special_V)  # fmt: skip
        ids = np.asarray(ids)
        assert np.all(tgt == ids[pos]) and np.all(np.diff(pos) > 0)
        assert not special_V[ids[pos]].any()  # [CLS]/[SEP] never chosen
        assert np.all(out[np.setdiff1d(np.arange(len(ids)), pos)] == ids[np.setdiff1d(
            np.arange(len(ids)), pos)])  # fmt: skip
        chosen, candidates = chosen + len(pos), candidates + 100
        kinds += [np.sum(out[pos] == MASK), np.sum((out[pos] != MASK) & (out[pos] != tgt)),
                  np.sum(out[pos] == tgt)]  # fmt: skip
        assert not special_V[out[pos][out[pos] != MASK]].any()  # random tokens are normal ones
    assert chosen / candidates == pytest.approx(0.15, abs=0.001)  # round(100 * 0.15) each row
    share = kinds / kinds.sum()
    assert share[0] == pytest.approx(0.8, abs=0.02)
    assert share[1] == pytest.approx(0.1, abs=0.015) and share[2] == pytest.approx(0.1, abs=0.015)


def test_whole_word_masking_takes_words_whole():
    rng = np.random.default_rng(1)
    special_V = np.zeros(50, bool)
    special_V[:5] = True
    cont_V = np.zeros(50, bool)
    cont_V[30:] = True  # ids >= 30 are "##" continuations
    ids = [CLS, 10, 31, 32, 11, 12, 33, SEP, 13, 34, 35, 36, SEP]
    words = [[1, 2, 3], [4], [5, 6], [8, 9, 10, 11]]
    for _ in range(200):
        _, pos, _ = choose_masks(ids, rng, mask_prob=0.4, max_predictions=10,
                                 special_V=special_V, continuation_V=cont_V)  # fmt: skip
        picked = set(pos.tolist())
        assert all(set(w) <= picked or not set(w) & picked for w in words)
        assert 1 <= len(pos) <= round(11 * 0.4)
    # a continuation right after a special token starts a word of its own
    _, pos, _ = choose_masks([CLS, 31, SEP], rng, mask_prob=0.5, max_predictions=4,
                             special_V=special_V, continuation_V=cont_V)  # fmt: skip
    assert pos.tolist() == [1]


def tagged_doc(d: int, n: int, length: int = 5) -> list[list[int]]:
    """Sentences of document d: token 1000 d + sentence index (so every token says where
    it came from)."""
    return [[1000 * d + s] * length for s in range(n)]


def test_document_pairs_labels_and_where_b_comes_from():
    rng = np.random.default_rng(0)
    docs = {d: tagged_doc(d, 12) for d in range(200)}
    labels = []

    def random_run(rng, n, own):
        other = int(rng.choice([d for d in docs if d != own]))
        start = int(rng.integers(len(docs[other])))
        return [t for s in docs[other][start:] for t in s][: max(n, 1)]

    for d, sents in docs.items():
        pairs = document_pairs(sents, rng, 23, 0.1, lambda r, n, d=d: random_run(r, n, d))
        for a, b, label in pairs:
            labels.append(label)
            assert {t // 1000 for t in a} == {d}
            sent_a = sorted({t % 1000 for t in a})
            assert sent_a == list(range(sent_a[0], sent_a[-1] + 1))  # consecutive sentences
            if label == IS_NEXT:  # the sentences right after A's, same document
                sent_b = sorted({t % 1000 for t in b})
                assert {t // 1000 for t in b} == {d} and sent_b[0] == sent_a[-1] + 1
            else:
                assert d not in {t // 1000 for t in b}
    assert len(labels) > 500
    assert np.mean(labels) == pytest.approx(0.5, abs=0.06)


def test_a_single_sentence_document_makes_no_pair():
    rng = np.random.default_rng(0)
    assert document_pairs([[7, 8, 9]], rng, 20, 0.0, lambda r, n: [1]) == []


def test_document_chunks_keep_every_token_in_order():
    """`nsp: false`: a one-sentence document makes one row; sentences gather up to the
    limit, a longer one is cut into pieces; nothing is lost or reordered."""
    rng = np.random.default_rng(0)
    assert document_chunks([[7, 8, 9]], rng, 20, 0.0) == [[7, 8, 9]]
    sents = [list(range(100 * i, 100 * i + n)) for i, n in enumerate([5, 9, 4, 30, 3, 8])]
    chunks = document_chunks(sents, rng, 12, 0.0)
    assert [t for c in chunks for t in c] == [t for s in sents for t in s]
    assert all(0 < len(c) <= 12 for c in chunks)
    assert chunks[:2] == [sents[0], sents[1]]  # 5 + 9 > 12: the second starts a new chunk
    for _ in range(20):  # random short targets still keep every token
        chunks = document_chunks(sents, rng, 12, 0.5)
        assert [t for c in chunks for t in c] == [t for s in sents for t in s]


@pytest.fixture(scope="module")
def marker_data(tmp_path_factory):
    """24 documents, each of one repeated character (its marker)."""
    data = tmp_path_factory.mktemp("markers")
    write_split(data, "train", [marker_doc(c) for c in MARKERS[:24]])
    return find_shards(data, "train")


def marker_of(wp_tok, ids) -> set[str]:
    return {wp_tok.id_to_piece(int(i)) for i in ids} & set(MARKERS)


def test_pipeline_pairs_nsp_and_per_process_slices(wp_tok, marker_data):
    """B of a negative pair comes from another document, of a positive pair from A's; each
    process uses only its own slice of the documents."""
    for pi in range(2):
        ds = make_mlm_eval_dataset(marker_data, wp_tok, LOADER, MLMConfig(mask_prob=0.3),
                                   seed=3, process_index=pi, process_count=2)  # fmt: skip
        used, labels = set(), []
        for batch in ds:
            targets = batch["mask_targets"]
            for r in np.flatnonzero(batch["nsp_weights"]):
                ids = batch["tokens"][r].copy()
                real = batch["segment_ids"][r] > 0
                pos = batch["mask_positions"][r][batch["mask_weights"][r] > 0]
                ids[pos] = targets[r][batch["mask_weights"][r] > 0]  # unmask
                a = marker_of(wp_tok, ids[real & (batch["token_types"][r] == 0)])
                b = marker_of(wp_tok, ids[real & (batch["token_types"][r] == 1)])
                assert len(a) == len(b) == 1
                assert (a == b) == (batch["nsp_labels"][r] == IS_NEXT)
                labels.append(int(batch["nsp_labels"][r]))
                used |= a | b
        assert set(labels) == {IS_NEXT, IS_RANDOM}
        assert {MARKERS.index(c) % 2 for c in used} == {pi}  # docs pi, pi + 2, ...


def test_without_nsp_rows_are_one_document_each(wp_tok, marker_data):
    """`nsp: false`: `[CLS] sentences of one document [SEP]`, token types 0, every row a
    real row (weight 1) with label 0, and every document's sentences used."""
    cfg = MLMConfig(mask_prob=0.3, nsp=False)
    seen = set()
    for batch in make_mlm_eval_dataset(marker_data, wp_tok, LOADER, cfg, seed=3):
        for r in np.flatnonzero(batch["nsp_weights"]):
            ids = batch["tokens"][r].copy()
            w = batch["mask_weights"][r] > 0
            ids[batch["mask_positions"][r][w]] = batch["mask_targets"][r][w]  # unmask
            n = int(batch["segment_ids"][r].sum())
            assert ids[0] == CLS and ids[n - 1] == SEP and SEP not in ids[1 : n - 1]
            assert not batch["token_types"][r].any() and batch["nsp_labels"][r] == IS_NEXT
            markers = marker_of(wp_tok, ids[:n])
            assert len(markers) == 1
            seen |= markers
    assert seen == set(MARKERS[:24])


def test_nsp_labels_are_half_random_over_a_corpus_pass(wp_tok, enc_data):
    shards = find_shards(enc_data, "train")
    labels = np.concatenate([
        b["nsp_labels"][b["nsp_weights"] > 0]
        for b in make_mlm_eval_dataset(shards, wp_tok, LOADER, MLMConfig(), seed=0)
    ])  # fmt: skip
    assert len(labels) > 300
    assert np.mean(labels) == pytest.approx(0.5, abs=0.06)


def test_batches_have_static_shapes_and_padding_has_zero_weight(wp_tok, marker_data):
    cfg = MLMConfig()
    m = max_predictions(cfg, LOADER.seq_len)
    assert m == 11  # ceil(0.15 * 64) + 1
    batches = list(make_mlm_eval_dataset(marker_data, wp_tok, LOADER, cfg, seed=0))
    for b in batches:
        assert b["tokens"].shape == (8, 64) and b["mask_positions"].shape == (8, m)
        assert b["nsp_labels"].shape == (8,) and b["mask_weights"].dtype == np.float32
        pad = b["nsp_weights"] == 0
        assert not b["segment_ids"][pad].any() and not b["mask_weights"][pad].any()
        real = b["mask_weights"] > 0
        assert np.all(b["mask_positions"][real] < b["segment_ids"].sum(1, keepdims=True)
                      .repeat(m, 1)[real])  # fmt: skip
    assert batches[-1]["nsp_weights"].sum() < 8 or len(batches) >= 1


def test_training_stream_is_seeded_and_resumes_to_identical_batches(wp_tok, enc_data):
    shards = find_shards(enc_data, "train")

    def stream(seed):
        return iter(make_mlm_dataset(shards, wp_tok, LOADER, MLMConfig(whole_word=True), seed=seed))

    it = stream(0)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
    expected = [next(it) for _ in range(4)]
    again = stream(0)
    again.set_state(state)
    for want in expected:
        got = next(again)
        assert all(np.array_equal(got[k], want[k]) for k in want)
    fresh, other = stream(0), stream(1)
    first = next(fresh)
    assert all(np.array_equal(first[k], v) for k, v in next(stream(0)).items())
    assert not np.array_equal(first["tokens"], next(other)["tokens"])


def test_too_few_documents_per_process_is_an_error(wp_tok, tmp_path):
    write_split(tmp_path, "train", [marker_doc("天"), marker_doc("地")])
    shards = find_shards(tmp_path, "train")
    with pytest.raises(DataError, match="at least 2 documents per process"):
        make_mlm_dataset(shards, wp_tok, LOADER, MLMConfig(), seed=0, process_count=2)


def test_one_document_per_process_is_enough_without_nsp(wp_tok, tmp_path):
    """`nsp: false` takes no negatives: one document per process makes its rows; NSP refuses
    it, naming the split and its shards."""
    write_split(tmp_path, "val", [marker_doc("天", sentences=4)])
    shards = find_shards(tmp_path, "val")
    cfg = MLMConfig(nsp=False, mask_prob=0.3)
    rows = []
    for batch in make_mlm_eval_dataset(shards, wp_tok, LOADER, cfg, seed=0):
        rows += [batch["segment_ids"][r].sum() for r in np.flatnonzero(batch["nsp_weights"])]
    # 天天。天天天。天天天天。天天。 → 2+1 + 3+1 + 4+1 + 2+1 characters, [CLS] and [SEP]
    assert rows == [15 + 2]
    with pytest.raises(DataError) as e:
        make_mlm_eval_dataset(shards, wp_tok, LOADER, MLMConfig(nsp=True), seed=0)
    msg = str(e.value)
    assert (
        msg.startswith("split 'val' (") and str(tmp_path / "val") in msg and "mlm.nsp: true" in msg
    )
    assert "at least 2 documents per process" in msg and "\n" not in msg
    with pytest.raises(DataError, match=r"split 'val' .*1 documents for 2 processes; mlm needs"):
        make_mlm_eval_dataset(shards, wp_tok, LOADER, cfg, seed=0, process_index=1, process_count=2)
