"""`dpo.loss: kto`: the mismatched prompt/answer rows against the rows rendered from those
texts, the step's loss against numpy, the stage end to end with a resume, and the settings
KTO refuses."""

import json
import shutil

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxllm.config import MeshConfig, from_dict
from jaxllm.config.alignment import DPOConfig
from jaxllm.data.preference import PAIR_KEYS, PreferencePair, PreferenceRecords, pair_features
from jaxllm.errors import ConfigError
from jaxllm.sharding import make_mesh
from jaxllm.trainers import dpo
from jaxllm.trainers.dpo import make_dpo_loss
from jaxllm.trainers.pairs import add_mismatched_rows, mismatched
from jaxllm.training.state import create_train_state, to_global
from jaxllm.training.step import make_train_step

from .conftest import run_stage, stage_config
from .test_dpo_stage import VAL, np_seq_logprobs, tiny_decoder
from .test_reward_stage import small_val

PICKS = (0, 1, 2, 200, 201, 202, 203, 5)  # rankings (1/15 a pair) and math pairs


def _batch(template, picks=PICKS, seq_len=64):
    records = PreferenceRecords([VAL])
    feats = [pair_features(records[i], template, seq_len) for i in picks]
    return records, {k: np.stack([f[k] for f in feats]) for k in feats[0]}


def test_mismatched_rows_are_each_prompt_with_the_next_pairs_answers(template):
    """Row (i, s) equals the rendering of pair i's prompt with side s's answer of the next
    real pair (cyclically), padding rows (weight 0) skipped and left zero."""
    records, batch = _batch(template, seq_len=128)
    assert batch["loss_mask"][..., -1].max() == 0  # nothing cut at 128: whole answers
    batch["weight"][3] = 0.0  # a padding row
    out = add_mismatched_rows(batch)
    real = [n for n in range(len(PICKS)) if n != 3]
    for n, i in enumerate(real):
        a, b = records[PICKS[i]], records[PICKS[real[(n + 1) % len(real)]]]
        want = pair_features(PreferencePair(a.prompt, b.chosen, b.rejected, 1.0, "", 0),
                             template, 128)  # fmt: skip
        for k in PAIR_KEYS:
            np.testing.assert_array_equal(out[f"kl_{k}"][i], want[k], err_msg=f"{k} of row {i}")
    for k in PAIR_KEYS:
        assert not out[f"kl_{k}"][3].any()
        np.testing.assert_array_equal(out[k], batch[k])  # the pairs themselves unchanged
    assert mismatched(out)["tokens"] is out["kl_tokens"]


def _np_kto(pi, ref, pi_kl, ref_kl, w, beta, lam_d, lam_u):
    """TRL's KTO loss on paired data in numpy: the mean over the 2 examples of every real
    pair (weighted), the reference point the weighted mean drift of the mismatched rows."""
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    z = max(0.0, float(np.sum(w[:, None] * (pi_kl - ref_kl)) / (2 * np.sum(w))))
    a, b = pi[:, 0] - ref[:, 0], pi[:, 1] - ref[:, 1]
    per = lam_d * (1 - sig(beta * (a - z))) + lam_u * (1 - sig(beta * (z - b)))
    return float(np.sum(w * per) / (2 * np.sum(w))), z


@pytest.mark.parametrize(
    "d,ref_seed",
    [(DPOConfig(loss="kto", beta=0.5), 2),  # policy - reference drift > 0: z is it
     (DPOConfig(loss="kto", beta=2.0, desirable_weight=1.33), 1)],  # drift < 0: z = 0
)  # fmt: skip
def test_kto_step_loss_matches_numpy_and_the_reference_point(template, d, ref_seed):
    _, batch = _batch(template)
    batch["weight"][-1] = 0.0
    batch = add_mismatched_rows(batch)
    vocab = template.tok.vocab_size
    mesh, tx = make_mesh(MeshConfig()), optax.adam(1e-2)
    graphdef, state, shardings = create_train_state(lambda: tiny_decoder(vocab, 0), tx, mesh,
                                                    "dp", 0)  # fmt: skip
    make_ref = lambda: tiny_decoder(vocab, ref_seed)  # noqa: E731
    _, ref_ts, _ = create_train_state(make_ref, tx, mesh, "dp", 0)
    ref_state = nnx.merge_state(ref_ts.params, ref_ts.frozen)
    ref_graphdef = nnx.split(make_ref())[0]
    policy = nnx.merge(graphdef, jax.tree.map(np.array, state.params), state.frozen)
    reference = nnx.merge(ref_graphdef, ref_state)
    kl_rows = {k: batch[f"kl_{k}"] for k in PAIR_KEYS}
    logps = [np_seq_logprobs(m, b, False) for m in (policy, reference) for b in (batch, kl_rows)]
    want, z = _np_kto(logps[0], logps[2], logps[1], logps[3], batch["weight"], d.beta,
                      d.desirable_weight, d.undesirable_weight)  # fmt: skip
    drift = np.sum(batch["weight"][:, None] * (logps[1] - logps[3])) / (2 * batch["weight"].sum())
    assert abs(drift) > 0.02 and z == max(drift, 0.0)  # both cases of the clamp are met
    step = make_train_step(graphdef, make_dpo_loss(d, ref_graphdef), tx, lambda s: 1e-2,
                           shardings, mesh, "dp",
                           const_shardings={"ref": jax.tree.map(lambda x: x.sharding, ref_state)})  # fmt: skip
    gbatch = to_global(batch, mesh)
    state, metrics = step(state, gbatch, {"ref": ref_state})
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=2e-4)
    np.testing.assert_allclose(float(metrics["kl"]), z, rtol=2e-3)
    for _ in range(2):
        state, metrics = step(state, gbatch, {"ref": ref_state})
    assert float(metrics["loss"]) < want


def test_kto_stage_end_to_end_and_resume(tmp_path, tiny_ckpt):
    val = small_val(tmp_path)
    cfg = stage_config("dpo", tiny_ckpt, tmp_path / "kto", train={"optim": {"lr": 1e-2}},
                       dpo={"val_file": str(val), "loss": "kto", "beta": 0.5})  # fmt: skip
    summary = run_stage(dpo, cfg)
    assert summary["dpo_margin_before"] == 0.0 and summary["dpo_accuracy_before"] == 0.5
    assert summary["dpo_margin_after"] > 0.0
    rows = [json.loads(x) for x in (tmp_path / "kto/metrics.jsonl").read_text().splitlines()]
    train = [m for m in rows if "loss" in m]
    assert train[0]["kl"] == 0.0  # policy == reference at the first step: no drift
    assert train[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # 1 - sigmoid(0) per example
    assert all(m["kl"] >= 0.0 for m in train) and max(m["kl"] for m in train) > 0.0
    shutil.rmtree(tmp_path / "kto/checkpoints/4")
    (tmp_path / "kto/summary.json").unlink()
    again = run_stage(dpo, cfg)
    assert again["resumed_from_step"] == 2
    assert again["final_train_loss"] == summary["final_train_loss"]


@pytest.mark.parametrize(
    "dpo_section,match",
    [({"loss": "kto", "precompute_reference": True}, r"'dpo.precompute_reference': KTO's"),
     ({"loss": "sigmoid", "desirable_weight": 1.2}, r"'dpo.desirable_weight': 1.2 weighs KTO.*use loss kto"),
     ({"loss": "kto", "undesirable_weight": 0.0}, r"'dpo.undesirable_weight': must be > 0"),
     ({"loss": "kto", "label_smoothing": 0.1}, r"'dpo.label_smoothing': 0.1 .*loss 'kto'")],
)  # fmt: skip
def test_kto_settings_that_cannot_apply_are_refused(dpo_section, match):
    with pytest.raises(ConfigError, match=match):
        from_dict({"stage": "dpo", "dpo": dpo_section})


def test_kto_needs_two_pairs_a_batch(tmp_path, tiny_ckpt):
    cfg = stage_config("dpo", tiny_ckpt, tmp_path / "one", loader={"batch_size": 1},
                       dpo={"loss": "kto"})  # fmt: skip
    with pytest.raises(ConfigError, match=r"'loader.batch_size': KTO .* at least 2 pairs"):
        run_stage(dpo, cfg)
