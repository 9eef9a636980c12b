"""The inference stages use the whole mesh: generate, score, black-box distill and SFT's
greedy exact match load the model on every device and split their batches by row over the
data axes (what the sampler prefills and what the scorer runs are global arrays, one block
of rows per device, never `jax.devices()[:1]`), and give the figures of one device."""

import json
from types import SimpleNamespace

import jax
import numpy as np
from flax import nnx

from jaxllm.config import MeshConfig, SFTConfig, from_dict, read_yaml
from jaxllm.data.sft import SFTRecords
from jaxllm.generation import generate_text
from jaxllm.sharding import make_mesh
from jaxllm.trainers import run_stage
from jaxllm.trainers import score as score_mod
from jaxllm.trainers.lm import load_checkpoint_model
from jaxllm.trainers.sft import make_answer_scorer
from tests.conftest import split_over_devices
from tests.sft.conftest import ROOT


def one_device(ckpt):
    return load_checkpoint_model(ckpt, make_mesh(MeshConfig(data=1), jax.devices()[:1]))


def test_generate_stage_splits_prompts_over_the_mesh(tmp_path, tiny_ckpt, tok, prefills):
    raw = read_yaml(ROOT / "configs/tiny_generate.yaml")
    raw.update(output_dir=str(tmp_path / "gen"), progress=False)
    raw["inputs"]["checkpoint"] = str(tiny_ckpt)
    raw["generate"].update(max_new_tokens=5, batch_size=3)
    cfg = from_dict(raw)
    run_stage(cfg)
    rows = [json.loads(x) for x in (tmp_path / "gen/generations.jsonl").read_text().splitlines()]
    assert prefills and len(rows) == 5
    for tokens, weights in prefills:
        split_over_devices(tokens, weights)
    graphdef, state, _, _ = one_device(tiny_ckpt)
    gen = cfg.generate
    want = generate_text(graphdef, state, tok, gen.prompts, gen, key=jax.random.key(cfg.seed))
    assert [r["completion"] for r in rows] == want  # sampled: same keys, same tokens


def test_score_stage_splits_rows_over_the_mesh(tmp_path, tiny_ckpt, monkeypatch):
    calls, real = [], score_mod.score_batch

    def spy(graphdef, state, tokens_BL, *args):
        calls.append((tokens_BL, state))
        return real(graphdef, state, tokens_BL, *args)

    monkeypatch.setattr(score_mod, "score_batch", spy)
    texts = ["In the beginning", "The LORD is my shepherd", "a", "hacker: n. one who"]
    raw = {"stage": "score", "name": "score", "output_dir": str(tmp_path / "s"),
           "progress": False, "inputs": {"checkpoint": str(tiny_ckpt)},
           "score": {"texts": texts, "batch_size": 3}}  # fmt: skip
    summary = run_stage(from_dict(raw))
    assert calls and summary["texts"] == 4
    for tokens, weights in calls:
        split_over_devices(tokens, weights)
    got = [json.loads(x) for x in (tmp_path / "s/scores.jsonl").read_text().splitlines()]
    monkeypatch.setattr(score_mod, "score_batch", real)
    graphdef, state, m, meta = one_device(tiny_ckpt)
    rows = score_mod._to_ids([{"text": t} for t in texts], meta["tokenizer"], m.vocab_size)
    want = score_mod.score_ids(graphdef, state, rows, 3, 64)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g["logprobs"], w["logprobs"], atol=2e-5, rtol=0)


def test_black_box_distill_answers_on_the_mesh(tmp_path, tiny_ckpt, prefills):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"What is {i} + {i}?", "response": str(2 * i)} for i in range(3)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    raw = read_yaml(ROOT / "configs/tiny_teacher_answers.yaml")
    raw.update(name="ta", output_dir=str(tmp_path / "ta"), progress=False)
    raw["inputs"]["checkpoint"] = str(tiny_ckpt)
    raw["distill"].update(prompts_file=str(prompts), val_prompts_file="", max_prompts=3,
                          max_new_tokens=4, batch_size=2, keep_truncated=True)  # fmt: skip
    summary = run_stage(from_dict(raw))
    assert summary["answers_train"] + summary["empty_answers_train"] == 3
    assert len(prefills) == 2  # batches of 2: each padded to the 8 devices
    for tokens, weights in prefills:
        split_over_devices(tokens, weights)


def test_sft_exact_match_on_the_mesh(tiny_ckpt, template, prefills):
    records = SFTRecords([ROOT / "jaxllm/assets/sft/val.jsonl"], "auto")
    s = SFTConfig(val_file="x", eval_examples=5, eval_max_new_tokens=4, eval_batch_size=4)

    def figures(mesh, rules):
        graphdef, state, _, _ = load_checkpoint_model(tiny_ckpt, mesh, rules)
        _, params, frozen = nnx.split(nnx.merge(graphdef, state), nnx.Param, ...)
        score = make_answer_scorer(graphdef, template, records, s, 0, mesh=mesh, rules=rules)
        return score(SimpleNamespace(params=params, frozen=frozen))

    mesh = make_mesh(MeshConfig(data=4, fsdp=2, rules="fsdp"))
    sharded = figures(mesh, "fsdp")
    assert len(prefills) == 2
    for tokens, _ in prefills:
        split_over_devices(tokens, [])
    one = figures(make_mesh(MeshConfig(data=1), jax.devices()[:1]), "dp")
    assert sharded == one
