"""Dense retrieval (`retrieval.method: dense`): the passages a task retrieves are the top k by
cosine similarity of an encoder checkpoint's mean-pooled vectors, checked against numpy:
each text run alone and unpadded through the encoder, pooled and compared by hand. Bad
input (no encoder, a decoder checkpoint as the encoder, no embedder) names the key."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from jaxllm.config import MeshConfig, from_dict
from jaxllm.errors import ConfigError
from jaxllm.evaluation import retrieval
from jaxllm.evaluation.runner import Generation, evaluate
from jaxllm.evaluation.tasks import load_task
from jaxllm.interop import load_tokenizer
from jaxllm.sharding import make_mesh
from jaxllm.trainers.embedder import retrieval_embedder
from jaxllm.trainers.encoder_model import load_encoder_model
from jaxllm.trainers.hf_import import import_hf
from jaxllm.training.checkpoint import Checkpointer
from tests.interop.conftest import write_bert_dir

# words of the test vocabulary (tests/interop/conftest.py), so few pieces are [UNK]
PASSAGES = ["the cat sat on the mat", "hello world", "dense retrieval over text",
            "a dog runs fast", "new york", "playing jax", "the dog sat on a mat"]  # fmt: skip
QUERIES = ["dense retrieval over text", "hello jax world", "new york runs", "a cat on a mat"]


class Silent:
    """A reader that fits everything and answers nothing (retrieval is what is tested)."""

    def fits(self, text, reserve):
        return True

    def generate(self, prompts, opts):
        return [Generation("", False) for _ in prompts]


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory):
    """An imported random BERT (torch-free): its run directory."""
    tmp = tmp_path_factory.mktemp("dense")
    import_hf(write_bert_dir(tmp / "hf"), tmp / "run", from_dict({"stage": "import"}))
    return tmp / "run"


def write_task(tmp_path, encoder, k=3, method="dense"):
    (tmp_path / "p.jsonl").write_text(
        "".join(json.dumps({"id": f"p{i}", "text": t}) + "\n" for i, t in enumerate(PASSAGES))
    )
    (tmp_path / "q.jsonl").write_text(
        "".join(json.dumps({"question": q, "answer": "x", "gold": "p2"}) + "\n" for q in QUERIES)
    )
    retrieval_keys = {"passages": "p.jsonl", "k": k, "gold": "gold", "method": method,
                      "encoder": str(encoder), "recall_at": [5]}  # fmt: skip
    spec = {"name": "dense", "kind": "generate", "data": "q.jsonl", "max_new_tokens": 2,
            "template": "{context}Q: {question}\nA:", "retrieval": retrieval_keys}  # fmt: skip
    (tmp_path / "dense.yaml").write_text(yaml.safe_dump(spec))
    return str(tmp_path / "dense.yaml")


def one_device():
    return make_mesh(MeshConfig(data=1), jax.devices()[:1])


def numpy_ranking(run, queries, passages):
    """Cosine top-all by hand: each text alone through the encoder, mean over its tokens
    (float64), cosines by dot products over norms, sorted by (-cosine, index)."""
    graphdef, state = load_encoder_model(run / "checkpoints", one_device()).encoder()
    hidden = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    tok = load_tokenizer(run / "tokenizer")

    def vec(t):
        return np.asarray(hidden(state, np.array([tok.encode_single(t)])), np.float64)[0].mean(0)

    P, Q = [vec(t) for t in passages], [vec(t) for t in queries]
    cos = [[q @ p / (np.linalg.norm(q) * np.linalg.norm(p)) for p in P] for q in Q]
    return [sorted(range(len(P)), key=lambda j, c=c: (-c[j], j)) for c in cos], np.array(cos)


def test_cosine_top_k_equals_a_loop_over_pairs():
    rng = np.random.default_rng(0)
    q, p = rng.normal(size=(5, 8)) * 3, rng.normal(size=(9, 8))
    p[4] = p[1] * 4.0  # the same direction, another length (a power of two: an exact tie)
    q[0] = p[1] * 0.5
    got = retrieval.cosine_top_k(q, p, 4)
    for i in range(5):
        cos = [float(q[i] @ p[j]) / (np.linalg.norm(q[i]) * np.linalg.norm(p[j])) for j in range(9)]
        want = sorted(range(9), key=lambda j: (-cos[j], j))[:4]
        assert got[i].tolist() == want
    assert got[0, :2].tolist() == [1, 4]
    assert retrieval.cosine_top_k(q, p, 20).shape == (5, 9)


def test_dense_index_in_a_task_ranks_by_cosine(tmp_path):
    """The runner's dense path with a stand-in encoder (word counts): retrieved ids and
    recall@n equal a by-hand ranking; the passage equal to the query ranks first."""
    vocab = sorted({w for t in PASSAGES + QUERIES for w in t.split()})
    seen = []

    def counts(texts):
        seen.append(len(texts))
        return np.array([[t.split().count(w) for w in vocab] for t in texts], np.float32)

    retrieval.cached_index.cache_clear()
    path = write_task(tmp_path, tmp_path)  # any directory stands for the encoder here
    res = evaluate(load_task(path), Silent(), embedder=lambda ckpt, key: counts)
    P, Q = counts(PASSAGES), counts(QUERIES)
    for i, s in enumerate(res.samples):
        cos = [Q[i] @ P[j] / (np.linalg.norm(Q[i]) * np.linalg.norm(P[j])) for j in range(7)]
        assert s["retrieved"] == [f"p{j}" for j in sorted(range(7), key=lambda j: (-cos[j], j))[:5]]
    assert res.samples[0]["retrieved"][0] == "p2"
    assert seen[:2] == [len(PASSAGES), len(QUERIES)]  # passages once, the queries in one call
    figures = {r["metric"]: r["value"] for r in res.rows}
    assert figures["recall@1"] == np.mean([s["retrieved"][0] == "p2" for s in res.samples])
    assert figures["recall@5"] == np.mean(["p2" in s["retrieved"] for s in res.samples])


@pytest.mark.slow  # importing the random BERT takes ~13 s on the loaded 2-core VM
def test_dense_retrieval_equals_the_numpy_ranking(encoder_run, tmp_path):
    retrieval.cached_index.cache_clear()
    path = write_task(tmp_path, encoder_run / "checkpoints")
    res = evaluate(load_task(path), Silent(), embedder=retrieval_embedder(one_device()))
    ranking, cos = numpy_ranking(encoder_run, QUERIES, PASSAGES)
    got = [s["retrieved"] for s in res.samples]
    assert got == [[f"p{j}" for j in r[:5]] for r in ranking]  # searched to recall_at
    assert got[0][0] == "p2"  # the passage equal to the query ranks first
    assert cos[0, 2] == pytest.approx(1.0, abs=1e-9) and np.sort(cos[0])[-2] < 1 - 1e-4
    figures = {r["metric"]: r["value"] for r in res.rows}
    hits = [r.index(2) for r in ranking]  # the gold passage's rank per query
    assert figures["recall@1"] == np.mean([h < 1 for h in hits])
    assert figures["recall@3"] == np.mean([h < 3 for h in hits])
    assert figures["recall@5"] == np.mean([h < 5 for h in hits])
    first = res.samples[0]["prompt"]
    assert first.startswith("Passage: dense retrieval over text\n") and first.count("Passage:") == 3


def test_dense_retrieval_bad_input_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"'retrieval.encoder': .*nowhere not found"):
        load_task(write_task(tmp_path, tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="'retrieval.encoder': method dense needs an encoder"):
        load_task(write_task(tmp_path, ""))
    with pytest.raises(ConfigError, match="'retrieval.method': dense retrieval needs an encoder"):
        evaluate(load_task(write_task(tmp_path, tmp_path)), Silent())
    dec = tmp_path / "decoder"  # a decoder checkpoint's metadata, as every decoder stage writes
    ckpt = Checkpointer(dec, async_save=False)
    ckpt.save(1, {"params": {"w": jnp.zeros(2)}}, {"model": {"arch": "decoder"}})
    ckpt.close()
    retrieval.cached_index.cache_clear()
    with pytest.raises(ConfigError, match=r"'retrieval.encoder': .*holds a decoder"):
        evaluate(
            load_task(write_task(tmp_path, dec)),
            Silent(),
            embedder=retrieval_embedder(one_device()),
        )
