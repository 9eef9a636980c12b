"""HF parity: random-weight transformers models (no downloads) → `stage: import` → the same
logits and the same greedy generations as transformers; export → `from_pretrained` → the same
logits as the original. Tiny shapes (hidden 64, 2 layers, vocab 128) keep the file fast."""

from __future__ import annotations

import functools
import json
import types
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from jaxllm.config import MeshConfig, from_dict  # noqa: E402
from jaxllm.config.interop import ScoreConfig  # noqa: E402
from jaxllm.config.quant import QuantizeConfig  # noqa: E402
from jaxllm.generation import Sampler  # noqa: E402
from jaxllm.interop import HFTokenizer, load_tokenizer  # noqa: E402
from jaxllm.interop.export import export_hf  # noqa: E402
from jaxllm.rundir import RunDir  # noqa: E402
from jaxllm.sharding import make_mesh  # noqa: E402
from jaxllm.trainers import score  # noqa: E402
from jaxllm.trainers.hf_export import export_checkpoint  # noqa: E402
from jaxllm.trainers.hf_import import import_hf  # noqa: E402
from jaxllm.trainers.lm import load_checkpoint_model  # noqa: E402

V, TOL = 128, 1e-4
_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=V,
    max_position_embeddings=256,
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=32,
)


def _hf_models():
    t = transformers
    return {
        # GQA (4 query heads, 2 kv heads), untied head, non-default theta
        "llama": lambda: t.LlamaForCausalLM(
            t.LlamaConfig(**_LLAMA, rope_theta=50000.0, tie_word_embeddings=False)
        ),
        "llama3_rope": lambda: t.LlamaForCausalLM(
            t.LlamaConfig(**_LLAMA, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)
        ),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**_LLAMA, tie_word_embeddings=False)),
        "gpt2": lambda: t.GPT2LMHeadModel(
            t.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=V, n_positions=64)
        ),
    }


@pytest.fixture(scope="module", params=["llama", "llama3_rope", "qwen2", "gpt2"])
def imported(request, tmp_path_factory):
    """(hf model, hf dir, run dir, graphdef, state, model cfg) for one family."""
    torch.manual_seed(0)
    hf = _hf_models()[request.param]().eval()
    tmp = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(tmp / "hf", safe_serialization=True)
    summary = import_hf(tmp / "hf", tmp / "run", from_dict({"stage": "generate"}))
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    graphdef, state, m, _ = load_checkpoint_model(Path(summary["outputs"]["checkpoint"]), mesh)
    return types.SimpleNamespace(
        name=request.param, hf=hf, dir=tmp, graphdef=graphdef, state=state, m=m, summary=summary
    )


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


def _ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, V, (batch, length)).astype(np.int32)


def _hf_logits(hf, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def test_logits_match(imported):
    ids = _ids(3, 24)
    ours = np.asarray(_forward(imported.graphdef, imported.state, ids))
    diff = float(np.abs(ours - _hf_logits(imported.hf, ids)).max())
    print(f"{imported.name}: max abs logit diff {diff:.2e}")
    assert diff <= TOL
    assert imported.summary["params"] == sum(p.numel() for p in imported.hf.parameters())


def test_greedy_generation_matches(imported):
    prompts = _ids(2, 8, seed=1)
    imported.hf.generation_config.eos_token_id = None
    imported.hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = imported.hf.generate(
            torch.tensor(prompts, dtype=torch.long),
            attention_mask=torch.ones(prompts.shape, dtype=torch.long),
            do_sample=False,
            max_new_tokens=32,
        )
    theirs = out[:, prompts.shape[1] :].numpy().tolist()
    res = Sampler(imported.graphdef)(
        imported.state, prompts.tolist(), max_new_tokens=32, key=jax.random.key(0)
    )
    assert [len(t) for t in theirs] == [32, 32]
    assert res.tokens == theirs


def test_export_loads_in_transformers(imported):
    out = export_hf(imported.state, imported.m, imported.dir / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back) is type(imported.hf)
    ids = _ids(2, 16, seed=2)
    diff = np.abs(_hf_logits(back, ids) - _hf_logits(imported.hf, ids)).max()
    assert diff <= TOL


def test_export_stage_from_checkpoint(imported):
    summary = export_checkpoint(imported.dir / "run" / "checkpoints", imported.dir / "exp2")
    assert summary["family"] == imported.hf.config.model_type
    back = transformers.AutoModelForCausalLM.from_pretrained(imported.dir / "exp2").eval()
    written = json.loads((imported.dir / "exp2/config.json").read_text())
    for key in ("bos_token_id", "eos_token_id"):  # kept from the source through the import
        assert written.get(key) == getattr(imported.hf.config, key) == getattr(back.config, key)
    ids = _ids(1, 12, seed=3)
    assert np.abs(_hf_logits(back, ids) - _hf_logits(imported.hf, ids)).max() <= TOL


def _log_softmax_np(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - (np.log(np.exp(logits - top).sum(-1, keepdims=True)) + top)


def test_score_matches_numpy_reference(imported, tmp_path):
    base = _ids(2, 30, seed=4)
    # Rows are prefixes of two sequences (a causal model's prefix logits are the full
    # sequence's), so one unpadded forward gives the reference for every row.
    logp = _log_softmax_np(np.asarray(_forward(imported.graphdef, imported.state, base)))
    cuts = [(0, 5), (1, 17), (0, 30), (1, 2), (0, 9)]
    rows = [base[b, :n].tolist() for b, n in cuts]
    compiled = score.score_batch._cache_size()
    results = score.score_ids(imported.graphdef, imported.state, rows, batch_size=2, max_len=64)
    # lengths [2, 5], [9, 17], [30] → buckets 16, 32, 32: one compile per bucket
    assert score.score_batch._cache_size() - compiled == 2
    for (b, n), res in zip(cuts, results):
        ref = logp[b, np.arange(n - 1), base[b, 1:n]]
        np.testing.assert_allclose(res["logprobs"], ref, atol=1e-4)
        assert res["num_tokens"] == n - 1
        assert res["total_logprob"] == pytest.approx(ref.sum(), abs=1e-3)
        assert res["ppl"] == pytest.approx(np.exp(-ref.mean()), rel=1e-4)
    if imported.name == "llama":
        _score_stage(imported, rows, tmp_path)


def _score_stage(imported, rows, tmp_path):
    """`score.run` end to end on token ids (the config root gains `score:` later)."""
    path = tmp_path / "ids.jsonl"
    path.write_text("".join(json.dumps({"ids": r}) + "\n" for r in rows))
    cfg = types.SimpleNamespace(
        score=ScoreConfig(texts_file=str(path), batch_size=2, max_len=64),
        mesh=MeshConfig(),  # every device: the stage splits its batches over them
        quantize=QuantizeConfig(),  # none
        inputs=types.SimpleNamespace(
            checkpoint=str(imported.dir / "run/checkpoints"), tokenizer=""
        ),
    )
    summary = score.run(cfg, RunDir(tmp_path / "run"))
    lines = [json.loads(x) for x in (tmp_path / "run/scores.jsonl").read_text().splitlines()]
    assert [x["ids"] for x in lines] == rows
    total = sum(x["total_logprob"] for x in lines)
    assert summary["ppl"] == pytest.approx(np.exp(-total / summary["tokens_scored"]))


def test_hf_tokenizer_json_import(tmp_path):
    """A tokenizer.json model: copied by the import, loaded by `load_tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(["hello world", "jax on a cpu", "hello jax"] * 20, trainer)
    hf_dir = tmp_path / "hf"
    torch.manual_seed(0)
    _hf_models()["llama"]().save_pretrained(hf_dir)
    tok.save(str(hf_dir / "tokenizer.json"))
    conf = {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "unk_token": "<unk>"}
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(conf))
    summary = import_hf(hf_dir, tmp_path / "run", from_dict({"stage": "generate"}))
    loaded = load_tokenizer(summary["outputs"]["tokenizer"])
    assert isinstance(loaded, HFTokenizer)
    ids = loaded.encode("hello jax", add_bos=True, add_eos=True)
    assert ids[0] == loaded.bos_id == 1 and ids[-1] == loaded.eos_id == 2
    assert loaded.decode(ids[1:-1]) == "hello jax"
    assert loaded.encode_batch(["hello", "world"]) == [
        loaded.encode("hello"),
        loaded.encode("world"),
    ]


def test_sharded_bf16_checkpoint(tmp_path):
    """A bf16 checkpoint in several shards (model.safetensors.index.json) imports exactly:
    bf16 weights are exact in float32, so logits match the HF model cast to float32."""
    torch.manual_seed(0)
    hf = _hf_models()["llama"]().to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="60KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    summary = import_hf(tmp_path / "hf", tmp_path / "run", from_dict({"stage": "generate"}))
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    g, state, _, _ = load_checkpoint_model(Path(summary["outputs"]["checkpoint"]), mesh)
    ids = _ids(2, 16, seed=5)
    ours = np.asarray(_forward(g, state, ids))
    assert np.abs(ours - _hf_logits(hf.float().eval(), ids)).max() <= TOL
