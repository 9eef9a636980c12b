"""`stage: dpo`: the step's loss against numpy, the reference stays bit-identical, and the
stage runs end to end under LoRA and resumes exactly."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxllm.config import MeshConfig, ModelConfig
from jaxllm.config.alignment import DPOConfig
from jaxllm.data.preference import PreferenceRecords, pair_features
from jaxllm.errors import ConfigError
from jaxllm.models import Decoder
from jaxllm.sharding import make_mesh
from jaxllm.trainers import dpo
from jaxllm.trainers.dpo import make_dpo_loss
from jaxllm.trainers.lm import load_frozen_model
from jaxllm.training.state import create_train_state, to_global
from jaxllm.training.step import make_train_step

from .conftest import ROOT, rerun_after_step_2, run_stage, stage_config
from .test_reward_stage import small_val

VAL = ROOT / "jaxllm/assets/preference/val.jsonl"


def tiny_decoder(vocab: int, seed: int) -> Decoder:
    m = ModelConfig(vocab_size=vocab, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=64)
    return Decoder(m, rngs=nnx.Rngs(seed))


def np_seq_logprobs(model, batch, average):
    """Sum (or mean) over the loss mask of log_softmax(logits)[target], in numpy."""
    tokens = np.asarray(batch["tokens"]).reshape(-1, 64)
    logits = np.asarray(
        model(jnp.asarray(tokens), positions_BL=jnp.asarray(batch["positions"]).reshape(-1, 64),
              segment_ids_BL=jnp.asarray(batch["segment_ids"]).reshape(-1, 64)),
        np.float64,
    )  # fmt: skip
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    targets = np.asarray(batch["targets"]).reshape(-1, 64)
    mask = np.asarray(batch["loss_mask"]).reshape(-1, 64)
    tok = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    seq = (tok * mask).sum(1)
    if average:
        seq = seq / mask.sum(1)
    return seq.reshape(-1, 2)


def np_margins(val, template, policy, reference, beta: float, average: bool) -> np.ndarray:
    """beta ((pi_c - ref_c) - (pi_r - ref_r)) per pair of `val`, in numpy, from the two
    checkpoints (sequence log-probs summed, or `average`d over each answer's tokens)."""
    records = PreferenceRecords([val])
    feats = [pair_features(records[i], template, 64) for i in range(len(records))]
    keys = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
    batch = {k: np.stack([f[k] for f in feats]) for k in keys}
    mesh = make_mesh(MeshConfig())
    pi, ref = (np_seq_logprobs(nnx.merge(*load_frozen_model(p, mesh, "dp")[:2]), batch, average)
               for p in (policy, reference))  # fmt: skip
    return beta * ((pi[:, 0] - ref[:, 0]) - (pi[:, 1] - ref[:, 1]))


def np_dpo(pi, ref, d: DPOConfig, w, n_c=None):
    """The step's loss and margin in numpy; `n_c`: each chosen answer's token count (RPO's
    NLL per token)."""
    h = (pi[:, 0] - ref[:, 0]) - (pi[:, 1] - ref[:, 1])
    ls = lambda x: -np.log1p(np.exp(-x))  # noqa: E731
    if d.loss == "ipo":
        per = (h - 1 / (2 * d.beta)) ** 2
    elif d.loss == "discopop":
        rho, mix = d.beta * h, 1 / (1 + np.exp(-d.beta * h / d.discopop_tau))
        per = (1 - mix) * -ls(rho) + mix * np.exp(-rho)
    elif d.loss == "robust":
        e = d.label_smoothing
        per = ((1 - e) * -ls(d.beta * h) + e * ls(-d.beta * h)) / (1 - 2 * e)
    else:
        s = d.label_smoothing
        per = -(1 - s) * ls(d.beta * h) - s * ls(-d.beta * h)
    if d.rpo_alpha:  # pi summed here: the chosen answer's NLL per token
        per = per + d.rpo_alpha * -pi[:, 0] / n_c
    return float(np.sum(w * per) / np.sum(w)), float(np.sum(w * d.beta * h) / np.sum(w))


def test_policy_runs_without_dropout_like_the_reference(template):
    """A model with dropout 0.1 as policy and reference (step 0): the policy's log-probs
    are taken without dropout too, so h = 0 for every pair and the loss is log 2 per pair,
    the margin 0 and every pair a tie (half a win)."""
    records = PreferenceRecords([VAL])
    feats = [pair_features(records[i], template, 64) for i in (0, 1, 2, 200, 201, 202)]
    batch = {k: jnp.asarray(np.stack([f[k] for f in feats])) for k in feats[0]}
    m = ModelConfig(vocab_size=template.tok.vocab_size, d_model=32, n_layers=1, n_heads=2,
                    d_ff=64, max_seq_len=64, dropout=0.1)  # fmt: skip
    graphdef, state = nnx.split(Decoder(m, rngs=nnx.Rngs(0)))
    loss_fn = make_dpo_loss(DPOConfig(beta=0.1), graphdef)
    dpo = jax.jit(lambda s, b: loss_fn(nnx.merge(graphdef, s), b, jax.random.key(1), {"ref": s}))
    loss, aux = dpo(state, batch)  # a training step's call: with a dropout key
    w = float(aux["weight"])  # the pair weights (rankings: 1/15 a pair)
    assert float(loss) / w == pytest.approx(np.log(2.0), rel=1e-6)
    assert float(aux["margin"]) == 0.0 and float(aux["accuracy"]) / w == pytest.approx(0.5)


def test_ipo_with_label_smoothing_is_refused():
    from jaxllm.config import from_dict

    with pytest.raises(ConfigError, match=r"'dpo.label_smoothing': 0.1 .*loss 'ipo'"):
        from_dict({"stage": "dpo", "dpo": {"loss": "ipo", "label_smoothing": 0.1}})


@pytest.mark.parametrize(
    "d",
    [DPOConfig(beta=0.5, label_smoothing=0.1), DPOConfig(loss="ipo"),
     DPOConfig(loss="robust", label_smoothing=0.2),
     DPOConfig(loss="discopop", beta=0.5, discopop_tau=0.1),
     DPOConfig(beta=0.5, rpo_alpha=0.7)],
)  # fmt: skip
def test_dpo_step_loss_matches_numpy_and_reference_is_frozen(template, d):
    vocab = template.tok.vocab_size
    records = PreferenceRecords([VAL])
    feats = [pair_features(records[i], template, 64) for i in (0, 1, 2, 200, 201, 202, 203, 1)]
    batch = {k: np.stack([f[k] for f in feats]) for k in feats[0]}
    batch["weight"][-1] = 0.0  # a padding row counts for nothing
    mesh = make_mesh(MeshConfig())
    tx = optax.adam(1e-2)
    graphdef, state, shardings = create_train_state(lambda: tiny_decoder(vocab, 0), tx, mesh,
                                                    "dp", 0)  # fmt: skip
    ref_graphdef = nnx.split(tiny_decoder(vocab, 1))[0]
    _, ref_ts, _ = create_train_state(lambda: tiny_decoder(vocab, 1), tx, mesh, "dp", 0)
    ref_state = nnx.merge_state(ref_ts.params, ref_ts.frozen)  # placed like the policy
    ref_before = jax.tree.map(np.array, ref_state)
    policy = nnx.merge(graphdef, jax.tree.map(np.array, state.params), state.frozen)
    reference = nnx.merge(ref_graphdef, ref_state)
    want_loss, want_margin = np_dpo(
        np_seq_logprobs(policy, batch, d.loss == "ipo"),
        np_seq_logprobs(reference, batch, d.loss == "ipo"), d, batch["weight"],
        batch["loss_mask"][:, 0].sum(-1),
    )  # fmt: skip
    ref_shardings = jax.tree.map(lambda x: x.sharding, ref_state)
    step = make_train_step(graphdef, make_dpo_loss(d, ref_graphdef), tx, lambda s: 1e-2,
                           shardings, mesh, "dp", const_shardings={"ref": ref_shardings})  # fmt: skip
    gbatch = to_global(batch, mesh)
    state, metrics = step(state, gbatch, {"ref": ref_state})
    np.testing.assert_allclose(float(metrics["loss"]), want_loss, rtol=2e-4)
    np.testing.assert_allclose(float(metrics["margin"]), want_margin, rtol=2e-3, atol=1e-5)
    assert ("nll" in metrics) == bool(d.rpo_alpha)
    for _ in range(2):
        state, metrics = step(state, gbatch, {"ref": ref_state})
    assert float(metrics["loss"]) < want_loss  # the policy moves ...
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b), ref_state, ref_before)
    assert all(jax.tree.leaves(same))  # ... the reference does not, bit for bit


def test_dpo_stage_lora_end_to_end_and_resume(tmp_path, tiny_ckpt, template):
    val = small_val(tmp_path)
    cfg = stage_config("dpo", tiny_ckpt, tmp_path / "dpo", dpo={"val_file": str(val)},
                       peft={"method": "lora", "rank": 4}, train={"optim": {"lr": 1e-2}})  # fmt: skip
    summary = run_stage(dpo, cfg)
    assert summary["dpo_margin_before"] == 0.0  # policy == reference before training
    assert summary["dpo_accuracy_before"] == 0.5  # every pair a tie: half a win
    assert summary["logp_margin_before"] != 0.0
    assert set(summary["logp_accuracy_by_task_after"]) == {"math", "service"}
    assert summary["dpo_margin_after"] > 0.0  # trained towards the chosen answers
    assert summary["trainable_share"] < 0.5
    metrics = [json.loads(x) for x in (tmp_path / "dpo/metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "loss" in m]
    assert {"reward_chosen", "reward_rejected", "margin", "accuracy"} <= set(train[0])
    assert [m["step"] for m in metrics if "eval_dpo_margin" in m] == [2, 4]
    # held-out dpo_margin is the training metric's quantity, beta h (TRL's rewards/margins):
    # recomputed in numpy from the handed-on policy and the reference checkpoint
    assert cfg.dpo.beta == 0.1  # tiny_dpo's
    margin = np_margins(val, template, tmp_path / "dpo/checkpoints", tiny_ckpt, 0.1, False)
    assert summary["dpo_margin_after"] == pytest.approx(margin.mean(), abs=2e-4)
    wins = (margin > 0) + 0.5 * (margin == 0)
    assert summary["dpo_accuracy_after"] == pytest.approx(wins.mean(), abs=1e-3)
    # a crash after step 2: the resumed run starts there and reproduces steps 3-4 exactly
    again = rerun_after_step_2(dpo, cfg)
    assert again["final_train_loss"] == summary["final_train_loss"]
    assert again["dpo_margin_after"] == summary["dpo_margin_after"]


def test_ipo_held_out_margin_is_of_length_averaged_logprobs(tmp_path, tiny_ckpt, template):
    """IPO trains on log-probs averaged over each answer's tokens: its held-out dpo_margin and
    accuracy are of those too (numpy, from the handed-on policy and the reference)."""
    val = small_val(tmp_path)
    cfg = stage_config("dpo", tiny_ckpt, tmp_path / "ipo", dpo={"val_file": str(val), "loss": "ipo"},
                       train={"steps": 1, "eval_every": 1, "checkpoint_every": 1,
                              "optim": {"lr": 1e-2}})  # fmt: skip
    summary = run_stage(dpo, cfg)
    policy, beta = tmp_path / "ipo/checkpoints", cfg.dpo.beta
    margin = np_margins(val, template, policy, tiny_ckpt, beta, average=True)
    other = np_margins(val, template, policy, tiny_ckpt, beta, average=False)
    assert abs(other.mean() - margin.mean()) > 1e-3  # the two definitions differ here
    assert summary["dpo_margin_after"] == pytest.approx(margin.mean(), abs=2e-4)
    wins = (margin > 0) + 0.5 * (margin == 0)
    assert summary["dpo_accuracy_after"] == pytest.approx(wins.mean(), abs=1e-3)


def test_qlora_reference_is_the_quantised_base(tmp_path, tiny_ckpt):
    cfg = stage_config("dpo", tiny_ckpt, tmp_path / "q", dpo={"val_file": str(small_val(tmp_path))},
                       peft={"method": "lora", "rank": 4}, quantize={"method": "int4", "group_size": 32},
                       train={"steps": 1, "eval_every": 1, "checkpoint_every": 1})  # fmt: skip
    summary = run_stage(dpo, cfg)  # a float reference would differ from the int4 policy here
    assert summary["dpo_margin_before"] == 0.0 and summary["dpo_accuracy_before"] == 0.5


def test_precomputed_reference_gives_the_per_step_losses_and_resumes(tmp_path, tiny_ckpt):
    data = small_val(tmp_path, n=16)  # train and held out on the same 16 pairs: 2 batches
    losses = {}
    for pre in (False, True):
        out = tmp_path / f"dpo_{pre}"
        cfg = stage_config("dpo", tiny_ckpt, out, train={"optim": {"lr": 1e-2}},
                           dpo={"train_file": str(data), "val_file": str(data),
                                "precompute_reference": pre})  # fmt: skip
        summary = run_stage(dpo, cfg)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        losses[pre] = [m["loss"] for m in rows if "loss" in m]
        assert len(losses[pre]) == 4 and losses[pre][-1] < losses[pre][0]
        assert summary["dpo_margin_before"] == 0.0
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
    # resume from step 2: the reference table is rebuilt and steps 3-4 repeat exactly
    again = rerun_after_step_2(dpo, cfg)
    assert again["final_train_loss"] == summary["final_train_loss"]
    assert again["dpo_margin_after"] == summary["dpo_margin_after"]


def test_a_reference_of_another_vocabulary_is_a_config_error(tmp_path):
    from jaxllm.trainers.checkpoint_model import check_same_vocab

    a, b = tmp_path / "a.model", tmp_path / "b"
    a.write_bytes(b"sentencepiece A")
    b.mkdir()
    (b / "tokenizer.json").write_bytes(b'{"model": "B"}')
    m = ModelConfig(vocab_size=300)
    with pytest.raises(ConfigError, match=r"'dpo.reference'.*vocab_size 400 differs.*\(300\)"):
        check_same_vocab("dpo.reference", ModelConfig(vocab_size=400), {}, m, str(a))
    with pytest.raises(ConfigError, match=r"'ppo.reward_checkpoint'.*tokenizer .*b\) is not"):
        check_same_vocab("ppo.reward_checkpoint", m, {"tokenizer": str(b)}, m, str(a))
    copy = tmp_path / "copy.model"
    copy.write_bytes(a.read_bytes())  # a run's own copy of the same tokenizer
    check_same_vocab("dpo.reference", m, {"tokenizer": str(copy)}, m, str(a))
    check_same_vocab("dpo.reference", m, {"tokenizer": "gs://bucket/tok.model"}, m, str(a))


@pytest.mark.parametrize(
    "d", [DPOConfig(loss="simpo", beta=2.0, gamma=0.5, label_smoothing=0.1),
          DPOConfig(loss="orpo", beta=0.2)],
)  # fmt: skip
def test_reference_free_step_loss_matches_numpy(template, d):
    """SimPO and ORPO steps run the policy alone (no consts, no ref_logp in the batch) on
    log-probs averaged over each answer's tokens: the first step's loss against numpy."""
    records = PreferenceRecords([VAL])
    feats = [pair_features(records[i], template, 64) for i in (0, 1, 2, 200, 201, 202, 203, 5)]
    batch = {k: np.stack([f[k] for f in feats]) for k in feats[0]}
    mesh, tx = make_mesh(MeshConfig()), optax.adam(1e-2)
    make = lambda: tiny_decoder(template.tok.vocab_size, 0)  # noqa: E731
    graphdef, state, shardings = create_train_state(make, tx, mesh, "dp", 0)
    policy = nnx.merge(graphdef, jax.tree.map(np.array, state.params), state.frozen)
    a = np_seq_logprobs(policy, batch, average=True)
    w = batch["weight"]
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    if d.loss == "simpo":
        z = d.beta * (a[:, 0] - a[:, 1]) - d.gamma
        per = -(1 - d.label_smoothing) * np.log(sig(z)) - d.label_smoothing * np.log(sig(-z))
    else:
        log_odds = lambda x: x - np.log1p(-np.exp(x))  # noqa: E731
        per = -a[:, 0] - d.beta * np.log(sig(log_odds(a[:, 0]) - log_odds(a[:, 1])))
    step = make_train_step(graphdef, make_dpo_loss(d, None), tx, lambda s: 1e-2, shardings,
                           mesh, "dp")  # fmt: skip
    gbatch = to_global(batch, mesh)
    state, metrics = step(state, gbatch)
    np.testing.assert_allclose(float(metrics["loss"]), np.sum(w * per) / np.sum(w), rtol=2e-4)
    margin = np.sum(w * d.beta * (a[:, 0] - a[:, 1])) / np.sum(w)
    np.testing.assert_allclose(float(metrics["margin"]), margin, rtol=2e-3, atol=1e-5)
    for _ in range(2):
        state, metrics = step(state, gbatch)
    assert float(metrics["loss"]) < np.sum(w * per) / np.sum(w)


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_stage_loads_no_reference_and_resumes(tmp_path, tiny_ckpt, template,
                                                              monkeypatch, loss):  # fmt: skip
    def no_reference(*args, **kwargs):
        raise AssertionError("a reference-free loss loaded a reference model")

    monkeypatch.setattr(dpo, "load_frozen_model", no_reference)
    val = small_val(tmp_path)
    cfg = stage_config("dpo", tiny_ckpt, tmp_path / loss, train={"optim": {"lr": 1e-2}},
                       dpo={"val_file": str(val), "loss": loss, "beta": 1.0})  # fmt: skip
    summary = run_stage(dpo, cfg)
    assert summary["reference"] is None
    # the held-out margin is beta (mean log-prob of chosen - of rejected): numpy, from the
    # start checkpoint (before) and the handed-on policy (after)
    monkeypatch.undo()
    for when, ckpt in (("before", tiny_ckpt), ("after", tmp_path / f"{loss}/checkpoints")):
        avg = avg_logps(val, template, ckpt)
        margin = avg[:, 0] - avg[:, 1]
        assert summary[f"dpo_margin_{when}"] == pytest.approx(margin.mean(), abs=2e-4)
        wins = (margin > 0) + 0.5 * (margin == 0)
        assert summary[f"avg_logp_accuracy_{when}"] == pytest.approx(wins.mean(), abs=1e-3)
    assert summary["dpo_margin_after"] > summary["dpo_margin_before"]
    assert ("final_train_nll" in summary) == (loss == "orpo")
    if loss == "orpo":
        return  # resuming is the stage's, whatever the loss: once is enough
    again = rerun_after_step_2(dpo, cfg)
    assert again["final_train_loss"] == summary["final_train_loss"]


def avg_logps(val, template, ckpt) -> np.ndarray:
    """[pairs, 2] log-probs of `val`'s answers averaged over their tokens, numpy, from `ckpt`."""
    records = PreferenceRecords([val])
    feats = [pair_features(records[i], template, 64) for i in range(len(records))]
    keys = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
    batch = {k: np.stack([f[k] for f in feats]) for k in keys}
    model = nnx.merge(*load_frozen_model(ckpt, make_mesh(MeshConfig()), "dp")[:2])
    return np_seq_logprobs(model, batch, average=True)


@pytest.mark.parametrize(
    "dpo_section,match",
    [({"loss": "simpo", "reference": "runs/x"}, r"'dpo.reference': loss 'simpo' has no reference"),
     ({"loss": "orpo", "precompute_reference": True}, r"'dpo.precompute_reference': loss 'orpo'"),
     ({"loss": "orpo", "label_smoothing": 0.1}, r"'dpo.label_smoothing': 0.1 .*loss 'orpo'"),
     ({"loss": "simpo", "gamma": -1.0}, r"'dpo.gamma': must be >= 0"),
     ({"loss": "hinge", "label_smoothing": 0.1}, r"'dpo.label_smoothing': 0.1 .*loss 'hinge'"),
     ({"loss": "robust"}, r"'dpo.label_smoothing': loss 'robust' needs the assumed share"),
     ({"loss": "sigmoid", "discopop_tau": 0.1}, r"'dpo.discopop_tau': 0.1 is DiscoPOP's"),
     ({"loss": "discopop", "discopop_tau": 0.0}, r"'dpo.discopop_tau': must be > 0"),
     ({"loss": "orpo", "rpo_alpha": 1.0}, r"'dpo.rpo_alpha': loss 'orpo' has its own NLL"),
     ({"loss": "kto", "rpo_alpha": 1.0}, r"'dpo.rpo_alpha': loss 'kto' has no chosen"),
     ({"rpo_alpha": -1.0}, r"'dpo.rpo_alpha': must be >= 0")],
)  # fmt: skip
def test_reference_free_settings_that_cannot_apply_are_refused(dpo_section, match):
    from jaxllm.config import from_dict

    with pytest.raises(ConfigError, match=match):
        from_dict({"stage": "dpo", "dpo": dpo_section})
