"""`stage: reward`: the scorer reads the last real token, and the stage trains (LoRA) end to end,
and its checkpoint loads as a fixed reward model for PPO."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.data.preference import (
    PreferenceRecords,
    make_preference_eval_dataset,
    pair_features,
)
from jaxllm.errors import ConfigError
from jaxllm.models import Decoder
from jaxllm.models.heads import ScalarModel
from jaxllm.sharding import make_mesh
from jaxllm.trainers import reward
from jaxllm.trainers.pairs import fit_report
from jaxllm.trainers.reward import pair_rewards
from jaxllm.trainers.reward_model import load_reward_model, reward_scores

from .conftest import ROOT, run_stage, stage_config

VAL = ROOT / "jaxllm/assets/preference/val.jsonl"


def small_val(tmp_path, n=12):
    """The first n held-out records (both tasks: rankings and pairs)."""
    lines = VAL.read_text(encoding="utf-8").splitlines()
    picks = lines[: n // 2] + [x for x in lines if '"task": "math"' in x][: n // 2]
    path = tmp_path / "val.jsonl"
    path.write_text("\n".join(picks) + "\n", encoding="utf-8")
    return path


def tiny_scalar_model(vocab: int) -> ScalarModel:
    m = ModelConfig(vocab_size=vocab, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=64)
    return ScalarModel(Decoder(m, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1), std=0.5)


def test_reward_read_at_last_real_token(template):
    model = tiny_scalar_model(template.tok.vocab_size)
    graphdef, state = nnx.split(model)
    records = PreferenceRecords([VAL])
    fits = (pair_features(records[i], template, 64) for i in range(len(records)))
    feats = next(f for f in fits if f["segment_ids"].sum(axis=1).max() < 64)  # not cut short
    batch = {k: jnp.asarray(v[None]) for k, v in feats.items() if k != "weight"}
    batch["weight"] = jnp.ones((1,))
    chosen, rejected = pair_rewards(model, batch)
    rows = {k: jnp.asarray(feats[k]) for k in ("tokens", "segment_ids", "positions")}
    r_B = reward_scores(graphdef, state, rows["tokens"], rows["segment_ids"], rows["positions"])
    s_BL = np.asarray(model(rows["tokens"], positions_BL=rows["positions"],
                            segment_ids_BL=rows["segment_ids"]))  # fmt: skip
    last = [int(np.nonzero(feats["segment_ids"][i])[0].max()) for i in range(2)]
    want = [s_BL[i, last[i]] for i in range(2)]
    np.testing.assert_allclose(np.asarray(r_B), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([float(chosen[0]), float(rejected[0])], want, rtol=1e-5, atol=1e-6)
    assert feats["tokens"][0, last[0]] == template.ids["<|end|>"]  # the answer's end marker
    # left padding (as in rollouts) reads the same token
    shift = 64 - 1 - max(last)
    rolled = {k: jnp.roll(v, shift, axis=1) for k, v in rows.items()}
    r_left = reward_scores(graphdef, state, rolled["tokens"], rolled["segment_ids"],
                           rolled["positions"])  # fmt: skip
    np.testing.assert_allclose(np.asarray(r_left), want, rtol=1e-4, atol=1e-5)


def test_fit_report_says_what_is_cut_and_refuses_a_file_cut_to_nothing(tmp_path, template,
                                                                       capsys):  # fmt: skip
    long = "Please tell me about my order and the refund and the shipping. " * 4
    fits = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go."}
    cut = {"prompt": long, "chosen": "Happy to help!", "rejected": "No."}  # the prompt fills L
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(fits) + "\n" + json.dumps(cut) + "\n")
    pairs, fit = fit_report("reward", path, template, 32)
    assert fit == {"pairs": 2, "cut": 1, "identical": 1, "without_answer": 1}
    assert [pairs[i].index for i in range(len(pairs))] == [0]  # the identical pair left out
    assert (f"reward: 1 of 2 pairs in {path} are longer than loader.seq_len 32 and cut"
            in capsys.readouterr().out)  # fmt: skip
    path.write_text(json.dumps(cut) + "\n")
    with pytest.raises(ConfigError, match=r"'loader.seq_len': 32 cuts every pair in .*pairs"):
        fit_report("reward", path, template, 32)


def test_reward_stage_lora_end_to_end(tmp_path, tiny_ckpt, template):
    val = small_val(tmp_path)
    # keep_best with a min_delta no later evaluation beats: best/ is step 2's, not the last
    best = {"keep_best": True, "early_stopping": {"metric": "reward_gap", "min_delta": 1e9}}
    cfg = stage_config(
        "reward", tiny_ckpt, tmp_path / "rm", reward={"val_file": str(val), "margin": 0.5},
        peft={"method": "lora", "rank": 4}, train=best,
    )  # fmt: skip
    summary = run_stage(reward, cfg)
    assert summary["best_step"] == 2 and summary["outputs"]["reward_checkpoint"].endswith("best")
    assert summary["train_fit"]["pairs"] == 9060 and summary["train_fit"]["identical"] == 0
    # zero head: every reward 0, so every pair a tie, half a win
    assert summary["pair_accuracy_before"] == summary["prompt_accuracy_before"] == 0.5
    assert summary["reward_gap_before"] == 0.0
    assert 0.0 <= summary["pair_accuracy_after"] <= 1.0
    assert set(summary["accuracy_by_task_after"]) == {"math", "service"}
    assert summary["trainable_share"] < 0.5  # adapters + head only
    metrics = [json.loads(x) for x in (tmp_path / "rm/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "eval_pair_accuracy" in m] == [2, 4]
    assert all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)
    # the handed-on LoRA checkpoint (best/, step 2) loads as a plain fixed reward model that
    # scores as the summary's figures after training say
    mesh = make_mesh(cfg.mesh)
    handed_on = summary["outputs"]["reward_checkpoint"]
    graphdef, state, _, m, meta = load_reward_model(handed_on, mesh)
    assert m.d_model == 32 and meta["config"]["stage"] == "reward"
    head = np.asarray(state["head"]["kernel"][...])
    assert np.abs(head).max() > 0  # the head trained under LoRA
    gaps, weights = [], []
    for batch in make_preference_eval_dataset([val], template, cfg.loader):
        rows = {k: v.reshape(-1, v.shape[-1]) for k, v in batch.items() if k != "weight"}
        r_N = reward_scores(graphdef, state, rows["tokens"], rows["segment_ids"],
                            rows["positions"])  # fmt: skip
        gaps.append(np.asarray(r_N).reshape(-1, 2) @ [1.0, -1.0])
        weights.append(batch["weight"])
    gap, w = np.concatenate(gaps), np.concatenate(weights)
    real = w > 0
    wins = (gap > 0) + 0.5 * (gap == 0)
    assert abs(wins[real].mean() - summary["pair_accuracy_after"]) < 1e-3  # each pair once
    assert abs(np.sum(w * wins) / np.sum(w) - summary["prompt_accuracy_after"]) < 1e-3
    assert abs(gap[real].mean() - summary["reward_gap_after"]) < 1e-3
    # trained on from its own checkpoint (full fine-tuning now): the LoRA folded in and the
    # trained head kept, so the new run starts where this one ended, not at a zero head
    more = stage_config(
        "reward", handed_on, tmp_path / "rm2", reward={"val_file": str(val)},
        train={"steps": 1, "eval_every": 1, "checkpoint_every": 1},
    )  # fmt: skip
    again = run_stage(reward, more)
    for key in ("pair_accuracy", "prompt_accuracy", "reward_gap"):
        assert again[f"{key}_before"] == pytest.approx(summary[f"{key}_after"], abs=1e-3)
    assert again["reward_gap_before"] != 0.0
