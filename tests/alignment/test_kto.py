"""`dpo.loss: kto`: the mismatched prompt/answer rows against the rows rendered from those
texts, the step's loss against numpy, the stage end to end on unpaired feedback (held-out
AUCs against numpy, a resume) and on pairs, and the settings KTO refuses."""

import json

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxllm.config import MeshConfig, from_dict
from jaxllm.config.alignment import DPOConfig
from jaxllm.data.feedback import FeedbackExample, FeedbackRecords, example_row
from jaxllm.data.preference import PAIR_KEYS, PreferenceRecords
from jaxllm.errors import ConfigError
from jaxllm.sharding import make_mesh
from jaxllm.trainers import dpo
from jaxllm.trainers.kto import add_mismatched_rows, make_kto_loss, mismatched, weighted_auc
from jaxllm.trainers.lm import load_frozen_model
from jaxllm.training.state import create_train_state, to_global
from jaxllm.training.step import make_train_step

from .conftest import rerun_after_step_2, run_stage, stage_config
from .test_dpo_stage import VAL, np_seq_logprobs, tiny_decoder
from .test_reward_stage import small_val

PICKS = (0, 1, 2, 3, 400, 401, 402, 403)  # a ranking's examples (1/15 each) and pairs'


def _batch(template, seq_len=64):
    records = FeedbackRecords([VAL])
    rows = [example_row(records[i], template, seq_len) for i in PICKS]
    return records, {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def np_row_logprobs(model, rows) -> np.ndarray:
    """[N] summed answer log-probs of rows [N, 64], N even, in numpy (`np_seq_logprobs`)."""
    return np_seq_logprobs(model, {k: rows[k] for k in PAIR_KEYS}, False).ravel()


def test_mismatched_rows_are_each_prompt_with_the_next_examples_answer(template):
    """Row i equals the rendering of example i's prompt with the next real example's answer
    (cyclically), padding rows (weight 0) skipped and left zero."""
    records, batch = _batch(template, seq_len=128)
    assert batch["loss_mask"][:, -1].max() == 0  # nothing cut at 128: whole answers
    assert sorted(set(batch["label"].tolist())) == [0, 1]
    batch["weight"][3] = 0.0  # a padding row
    out = add_mismatched_rows(batch)
    real = [n for n in range(len(PICKS)) if n != 3]
    for n, i in enumerate(real):
        a, b = records[PICKS[i]], records[PICKS[real[(n + 1) % len(real)]]]
        want = example_row(FeedbackExample(a.prompt, b.completion, True, 1.0, "", 0), template, 128)
        for k in PAIR_KEYS:
            np.testing.assert_array_equal(out[f"kl_{k}"][i], want[k], err_msg=f"{k} of row {i}")
    for k in PAIR_KEYS:
        assert not out[f"kl_{k}"][3].any()
        np.testing.assert_array_equal(out[k], batch[k])  # the examples themselves unchanged
    assert mismatched(out)["tokens"] is out["kl_tokens"]


def _np_kto(pi, ref, pi_kl, ref_kl, label, w, beta, lam_d, lam_u):
    """KTO in numpy: the weighted mean over the examples, the reference point the weighted
    mean drift of the mismatched rows, clamped at 0."""
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    z = max(0.0, float(np.sum(w * (pi_kl - ref_kl)) / np.sum(w)))
    r = pi - ref
    per = np.where(label > 0, lam_d * (1 - sig(beta * (r - z))), lam_u * (1 - sig(beta * (z - r))))
    return float(np.sum(w * per) / np.sum(w)), z


@pytest.mark.parametrize(
    "d,ref_seed",
    [(DPOConfig(loss="kto", beta=0.5), 2),
     (DPOConfig(loss="kto", beta=2.0, desirable_weight=1.33), 1)],
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
    logps = [np_row_logprobs(m, b) for m in (policy, reference) for b in (batch, mismatched(batch))]
    w = batch["weight"]
    want, z = _np_kto(logps[0], logps[2], logps[1], logps[3], batch["label"], w, d.beta,
                      d.desirable_weight, d.undesirable_weight)  # fmt: skip
    drift = np.sum(w * (logps[1] - logps[3])) / w.sum()
    assert abs(drift) > 0.01 and z == max(drift, 0.0)  # seeds 2 and 1: both sides of the clamp
    step = make_train_step(graphdef, make_kto_loss(d, ref_graphdef), tx, lambda s: 1e-2,
                           shardings, mesh, "dp",
                           const_shardings={"ref": jax.tree.map(lambda x: x.sharding, ref_state)})  # fmt: skip
    gbatch = to_global(batch, mesh)
    state, metrics = step(state, gbatch, {"ref": ref_state})
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=2e-4)
    np.testing.assert_allclose(float(metrics["kl"]), z, rtol=2e-3, atol=1e-6)
    for _ in range(2):
        state, metrics = step(state, gbatch, {"ref": ref_state})
    assert float(metrics["loss"]) < want


def test_weighted_auc_against_all_pairs_counted():
    rng = np.random.default_rng(0)
    score = rng.integers(0, 6, 40).astype(float)  # many ties
    label, w = rng.integers(0, 2, 40), rng.uniform(0, 2, 40) * (rng.uniform(size=40) > 0.2)
    num = den = 0.0
    for i in np.flatnonzero((label == 1) & (w > 0)):
        for j in np.flatnonzero((label == 0) & (w > 0)):
            num += w[i] * w[j] * ((score[i] > score[j]) + 0.5 * (score[i] == score[j]))
            den += w[i] * w[j]
    assert weighted_auc(score, label, w) == round(num / den, 4)
    assert weighted_auc(score, np.ones(40), w) is None


def unpaired_file(path, pairs_file, n=None):
    """Each pair of `pairs_file` as two unpaired records (chosen true, rejected false)."""
    records = PreferenceRecords([pairs_file])
    lines = []
    for i in range(len(records) if n is None else n):
        p = records[i]
        lines += [{"messages": p.prompt, "completion": c, "label": label}
                  for c, label in ((p.chosen, True), (p.rejected, False))]  # fmt: skip
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_kto_stage_on_unpaired_feedback_and_resume(tmp_path, tiny_ckpt, template):
    data = unpaired_file(tmp_path / "fb.jsonl", small_val(tmp_path, n=16))
    cfg = stage_config("dpo", tiny_ckpt, tmp_path / "kto", train={"optim": {"lr": 1e-2}},
                       dpo={"train_file": str(data), "val_file": str(data), "loss": "kto",
                            "beta": 0.5})  # fmt: skip
    summary = run_stage(dpo, cfg)
    assert summary["train_fit"]["examples"] == summary["val_fit"]["examples"] > 16
    assert summary["reward_auc_before"] == 0.5  # policy == reference: every reward 0
    assert summary["reward_auc_after"] > 0.5  # trained to separate good answers from bad
    rows = [json.loads(x) for x in (tmp_path / "kto/metrics.jsonl").read_text().splitlines()]
    train = [m for m in rows if "loss" in m]
    assert train[0]["kl"] == 0.0 and train[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert {"reward_desirable", "reward_undesirable"} <= set(train[-1])
    # the held-out figures recomputed in numpy from the handed-on policy and the reference
    records = FeedbackRecords([data])
    ex = [example_row(records[i], template, 64) for i in range(len(records))]
    rows = {k: np.stack([r[k] for r in ex]) for k in ex[0]}
    mesh = make_mesh(MeshConfig())
    pi, ref = (np_row_logprobs(nnx.merge(*load_frozen_model(c, mesh, "dp")[:2]), rows)
               for c in (tmp_path / "kto/checkpoints", tiny_ckpt))  # fmt: skip
    reward, good = 0.5 * (pi - ref), rows["label"] == 1
    pairs = [(a > b) + 0.5 * (a == b) for a in reward[good] for b in reward[~good]]
    assert summary["reward_auc_after"] == pytest.approx(np.mean(pairs), abs=2e-3)
    assert summary["reward_desirable_after"] == pytest.approx(reward[good].mean(), abs=2e-3)
    n = rows["loss_mask"].sum(1)
    avg = pi / n
    pairs = [(a > b) + 0.5 * (a == b) for a in avg[good] for b in avg[~good]]
    assert summary["avg_logp_auc_after"] == pytest.approx(np.mean(pairs), abs=2e-3)
    again = rerun_after_step_2(dpo, cfg)
    assert again["final_train_loss"] == summary["final_train_loss"]
    assert again["reward_auc_after"] == summary["reward_auc_after"]


def test_kto_stage_on_pairs_reports_the_pair_figures(tmp_path, tiny_ckpt):
    cfg = stage_config("dpo", tiny_ckpt, tmp_path / "kto", train={"optim": {"lr": 1e-2}},
                       dpo={"val_file": str(small_val(tmp_path)), "loss": "kto"})  # fmt: skip
    summary = run_stage(dpo, cfg)
    assert summary["dpo_margin_before"] == 0.0 and summary["dpo_margin_after"] > 0.0
    assert summary["train_fit"]["examples"] > 2 * 1000  # each pair two examples
    assert summary["final_train_kl"] >= 0.0


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


def test_kto_needs_two_examples_a_batch_and_other_losses_need_pairs(tmp_path, tiny_ckpt):
    cfg = stage_config("dpo", tiny_ckpt, tmp_path / "one", loader={"batch_size": 1},
                       dpo={"loss": "kto"})  # fmt: skip
    with pytest.raises(ConfigError, match=r"'loader.batch_size': KTO .* at least 2 examples"):
        run_stage(dpo, cfg)
    data = unpaired_file(tmp_path / "fb.jsonl", small_val(tmp_path), n=2)
    cfg = stage_config("dpo", tiny_ckpt, tmp_path / "dpo", dpo={"train_file": str(data)})
    with pytest.raises(Exception, match=r"fb.jsonl:1: expected .* trains with dpo.loss kto"):
        run_stage(dpo, cfg)
