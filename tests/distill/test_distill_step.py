"""The white-box distillation loss inside the jitted train step against a numpy reference,
and the teacher (a step constant) is never updated."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import DistillConfig, MeshConfig, ModelConfig, OptimConfig
from jaxllm.models import Decoder
from jaxllm.sharding import make_mesh
from jaxllm.trainers.distill import distill_lm_loss
from jaxllm.trainers.lm import model_fn
from jaxllm.training.optim import lr_schedule, make_optimizer
from jaxllm.training.state import create_train_state, to_global
from jaxllm.training.step import make_train_step

V, L, B = 48, 8, 3
COMMON = dict(vocab_size=V, max_seq_len=L, positions="rope", norm="rmsnorm", mlp="swiglu")
TEACHER = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, **COMMON)
STUDENT = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, **COMMON)
OPT = OptimConfig(lr=1e-2, warmup_steps=1)


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, size=(B, L + 1)).astype(np.int32)
    mask = (rng.random((B, L)) > 0.3).astype(np.float32)
    return {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": np.ones((B, L), np.int32),
        "positions": np.arange(L, dtype=np.int32)[None].repeat(B, 0),
        "loss_mask": mask,
    }


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_reference(s_logits, t_logits, batch, alpha, temp, kind, z=0.0):
    """((1 - alpha) * CE + alpha * T^2 * KL + z * lse^2) / tokens, in float64 (the PaLM
    z-loss in full, not scaled by 1 - alpha, as pretraining and the baseline add it)."""
    s, t = s_logits.astype(np.float64), t_logits.astype(np.float64)
    mask = batch["loss_mask"].astype(np.float64)
    logp = np_log_softmax(s)
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    ls, lt = np_log_softmax(s / temp), np_log_softmax(t / temp)
    p, q = (lt, ls) if kind == "forward" else (ls, lt)
    kl = (np.exp(p) * (p - q)).sum(-1)
    lse = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
    total = (1 - alpha) * (nll * mask).sum() + alpha * temp**2 * (kl * mask).sum()
    total += z * (lse**2 * mask).sum()
    return total / mask.sum(), (kl * mask).sum() / mask.sum()


def logits(model, batch):
    out = model(
        batch["tokens"], positions_BL=batch["positions"], segment_ids_BL=batch["segment_ids"],
        deterministic=True,
    )  # fmt: skip
    return np.asarray(out, np.float64)


@pytest.mark.parametrize(
    ("alpha", "temp", "kind", "z"), [(0.7, 2.0, "forward", 1e-2), (0.4, 1.0, "reverse", 0.0)]
)
def test_step_loss_matches_numpy_and_teacher_is_fixed(alpha, temp, kind, z):
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    teacher = Decoder(TEACHER, rngs=nnx.Rngs(1))
    tg, tstate = nnx.split(teacher)
    t_before = jax.tree.map(np.array, tstate)
    tx = make_optimizer(OPT, 4)
    graphdef, state, sh = create_train_state(model_fn(STUDENT, 0), tx, mesh, "dp", 0)
    d = DistillConfig(alpha=alpha, temperature=temp, kind=kind)
    step = make_train_step(
        graphdef, distill_lm_loss(tg, d, z), tx, lr_schedule(OPT, 4), sh, mesh, "dp",
        const_shardings={"teacher": jax.tree.map(lambda x: x.sharding, tstate)},
    )  # fmt: skip
    batch = make_batch()
    s_logits = logits(nnx.merge(graphdef, state.params, state.frozen), batch)
    ref_loss, ref_kl = np_reference(s_logits, logits(teacher, batch), batch, alpha, temp, kind, z)
    consts = {"teacher": tstate}
    state, metrics = step(state, to_global(batch, mesh), consts)
    np.testing.assert_allclose(float(metrics["loss"]), ref_loss, rtol=2e-5)
    np.testing.assert_allclose(float(metrics["kl"]), ref_kl, rtol=2e-5, atol=1e-7)
    for i in range(3):  # the student learns, the teacher stays exactly as it was
        state, metrics = step(state, to_global(make_batch(i + 1), mesh), consts)
    after = jax.tree.map(np.array, consts["teacher"])
    jax.tree.map(np.testing.assert_array_equal, t_before, after)
    new_s = logits(nnx.merge(graphdef, state.params, state.frozen), batch)
    assert not np.allclose(new_s, s_logits)
