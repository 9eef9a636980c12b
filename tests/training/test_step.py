"""The jitted train step: compiles once, accumulation = bigger batch, and every mesh layout
(data, FSDP, FSDP+TP on 8 simulated devices) gives the losses of one device."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxllm.config import MeshConfig, ModelConfig, OptimConfig, replace
from jaxllm.sharding import make_mesh
from jaxllm.trainers.lm import lm_loss, model_fn
from jaxllm.training.optim import lr_schedule, make_optimizer
from jaxllm.training.state import create_train_state, to_global
from jaxllm.training.step import make_train_step

MODEL = ModelConfig(
    vocab_size=64,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    d_ff=64,
    max_seq_len=16,
    positions="rope",
    norm="rmsnorm",
    mlp="swiglu",
    use_bias=False,
)
OPT = OptimConfig(lr=1e-2, warmup_steps=2)


def batches(n, b=8, length=16, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = rng.integers(4, 64, size=(b, length + 1)).astype(np.int32)
        seg = np.ones((b, length), np.int32)
        seg[:, length // 2 :] = 2  # two packed documents per row
        pos = np.concatenate([np.arange(length // 2)] * 2)[None].repeat(b, 0).astype(np.int32)
        out.append(
            {
                "tokens": tokens[:, :-1],
                "targets": tokens[:, 1:],
                "segment_ids": seg,
                "positions": pos,
                "loss_mask": np.ones((b, length), np.float32),
            }
        )
    return out


def setup(mesh_cfg, devices, grad_accum=1, model=MODEL, loss_chunk=0, opt=OPT):
    mesh = make_mesh(mesh_cfg, devices)
    tx = make_optimizer(opt, 10)
    graphdef, state, sh = create_train_state(model_fn(model, 0), tx, mesh, mesh_cfg.rules, 0)
    loss = lm_loss(loss_chunk=loss_chunk) if loss_chunk else lm_loss()
    step = make_train_step(
        graphdef, loss, tx, lr_schedule(opt, 10), sh, mesh, mesh_cfg.rules, grad_accum
    )
    return mesh, state, step, sh


def losses(mesh_cfg, devices, n=5, **kw):
    mesh, state, step, sh = setup(mesh_cfg, devices, **kw)
    out = []
    for b in batches(n):
        state, m = step(state, to_global(b, mesh))
        out.append(float(m["loss"]))
    return out, state, sh


def test_muon_on_a_mesh_matches_one_device():
    """Muon's per-matrix Newton-Schulz on weights split over fsdp and tensor axes: the losses
    of one device."""
    muon = replace(OPT, name="muon")
    ref, _, _ = losses(MeshConfig(data=1, rules="dp"), jax.devices()[:1], opt=muon)
    got, state, sh = losses(MeshConfig(2, 2, 2, rules="fsdp_tp"), jax.devices(), opt=muon)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert ref[-1] < ref[0]
    # one sharding per array of the optimizer state (optax.partition's empty slots get none),
    # each of the array's rank: what --plan and checkpoint restores read leaf by leaf
    arrays, shardings = jax.tree.leaves(state.opt_state), jax.tree.leaves(sh.opt_state)
    assert len(arrays) == len(shardings)
    assert all(a.sharding == s for a, s in zip(arrays, shardings, strict=True))


def test_step_compiles_once():
    mesh, state, step, _ = setup(MeshConfig(data=1), jax.devices()[:1])
    for b in batches(4):
        state, _ = step(state, to_global(b, mesh))
    assert step._cache_size() == 1
    assert int(state.step) == 4


@pytest.mark.parametrize(
    ("shape", "rules"), [((8, 1, 1), "dp"), ((1, 8, 1), "fsdp"), ((2, 2, 2), "fsdp_tp")]
)
def test_meshes_match_one_device(shape, rules):
    ref, _, _ = losses(MeshConfig(data=1, rules="dp"), jax.devices()[:1])
    got, state, sh = losses(MeshConfig(*shape, rules=rules), jax.devices())
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert ref[-1] < ref[0]  # it learns
    # every weight is placed as the rules say
    q = state.params["blocks"][0]["attn"]["q"]
    emb = state.params["embed"]["embedding"]
    want = {
        "dp": (P(None, None, None), P(None, None)),
        "fsdp": (P("fsdp", None, None), P(None, "fsdp")),
        "fsdp_tp": (P("fsdp", "tensor", None), P("tensor", "fsdp")),
    }[rules]
    assert q.sharding.spec == want[0] and emb.sharding.spec == want[1]
    assert q.sharding.spec == sh.params["blocks"][0]["attn"]["q"].get_value().spec
    # optimizer moments follow their parameters
    mu = state.opt_state[1][0].mu["blocks"][0]["attn"]["q"]
    assert mu.sharding.spec == want[0]


def test_fused_output_loss_gives_the_plain_losses():
    """`loss_chunk` (the output layer fused into the loss, 4 positions at a time) on the
    FSDP+TP mesh (embedding sharded over vocab and fsdp): the plain one-device losses, step
    for step. (An untied head's weight comes from `output_weight`, tested below.)"""
    ref, _, _ = losses(MeshConfig(data=1, rules="dp"), jax.devices()[:1])
    got, _, _ = losses(MeshConfig(2, 2, 2, rules="fsdp_tp"), jax.devices(), loss_chunk=4)
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_output_weight_is_the_output_layer():
    """`output_weight()` [V, D] gives the logits of `logits()`, tied or untied; None under a
    LoRA'd head (the loss then takes the plain path)."""
    from flax import nnx

    from jaxllm.config import PeftConfig
    from jaxllm.models import Decoder
    from jaxllm.models.lora import apply_lora

    x = jax.random.normal(jax.random.key(0), (2, 3, MODEL.d_model))
    for tied in (True, False):
        dec = Decoder(replace(MODEL, tie_embeddings=tied), rngs=nnx.Rngs(0))
        want = np.asarray(dec.logits(x))
        got = np.asarray(x @ dec.output_weight().T)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    apply_lora(dec, PeftConfig(method="lora", rank=2, targets=("head",)), nnx.Rngs(1))
    assert dec.output_weight() is None


def test_grad_accumulation_equals_bigger_batch():
    dev = jax.devices()[:1]
    big = batches(3, b=8)
    mesh, s1, step1, _ = setup(MeshConfig(data=1), dev)
    mesh2, s2, step2, _ = setup(MeshConfig(data=1), dev, grad_accum=2)
    for b in big:
        s1, m1 = step1(s1, to_global(b, mesh))
        micro = {k: v.reshape(2, 4, *v.shape[1:]) for k, v in b.items()}
        s2, m2 = step2(s2, to_global(micro, mesh2, leading=1))
        np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


def test_unworkable_mesh_fails_before_compiling():
    from jaxllm.config import from_dict
    from jaxllm.errors import ConfigError
    from jaxllm.sharding import validate_mesh

    def cfg(**kw):
        base = {
            "stage": "pretrain",
            "model": {"n_heads": 4, "d_model": 32, "d_ff": 64},
            "mesh": {"data": 1, "fsdp": 2, "tensor": 4, "rules": "fsdp_tp"},
            "loader": {"batch_size": 8},
        }
        for k, v in kw.items():
            base[k] = {**base[k], **v}
        return from_dict(base)

    with pytest.raises(ConfigError, match="'model.n_kv_heads': 2 is not divisible by the tensor"):
        validate_mesh(cfg(model={"n_kv_heads": 2}), 8, 64)
    with pytest.raises(ConfigError, match="'model.vocab_size': 66 is not divisible"):
        validate_mesh(cfg(), 8, 66)
    with pytest.raises(ConfigError, match="'loader.batch_size': 3 is not divisible by data×fsdp"):
        validate_mesh(cfg(loader={"batch_size": 3}), 8, 64)
    with pytest.raises(ConfigError, match="data×fsdp×tensor = 8 but there are 4 devices"):
        validate_mesh(cfg(), 4, 64)
    validate_mesh(cfg(), 8, 64)  # a workable one passes


def test_a_loaded_model_is_checked_against_the_mesh(tiny_ckpt):
    from jaxllm.errors import ConfigError
    from jaxllm.trainers.checkpoint_model import load_checkpoint_model

    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=8, rules="fsdp_tp"))
    with pytest.raises(ConfigError, match=r"'model.n_heads' of .*: 2 is not divisible by the "
                       r"tensor axis \(8\); set mesh.tensor to a divisor"):  # fmt: skip
        load_checkpoint_model(tiny_ckpt, mesh, "fsdp_tp")  # not a raw IndivisibleError
