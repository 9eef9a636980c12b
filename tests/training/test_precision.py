"""Mixed precision: trained weights and Adam's moments are float32 whatever the compute dtype;
16-bit master weights and float16 compute (no loss scaling) are refused with a clear error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import MeshConfig, ModelConfig, OptimConfig, from_dict
from jaxllm.errors import ConfigError
from jaxllm.sharding import make_mesh
from jaxllm.trainers.lm import fresh_train_state, lm_loss, model_fn, resolve_model
from jaxllm.training.optim import lr_schedule, make_optimizer
from jaxllm.training.state import create_train_state, to_global
from jaxllm.training.step import make_train_step

SMALL = dict(vocab_size=64, d_model=32, n_layers=1, n_heads=4, d_ff=64, max_seq_len=16)


def pretrain_cfg(**model):
    model = {**SMALL, **model}
    return from_dict({"stage": "pretrain", "model": model, "loader": {"seq_len": 16}})


def test_config_refuses_16_bit_master_weights_and_float16_compute():
    with pytest.raises(ConfigError, match="'model.param_dtype'.*param_dtype: float32"):
        resolve_model(pretrain_cfg(dtype="bfloat16", param_dtype="bfloat16"), 64)
    with pytest.raises(ConfigError, match="'model.dtype': float16 training needs loss scaling"):
        resolve_model(pretrain_cfg(dtype="float16"), 64)
    assert resolve_model(pretrain_cfg(dtype="bfloat16"), 64).param_dtype == "float32"


def _float_dtypes(tree) -> set:
    return {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def test_bf16_weights_become_float32_master_weights():
    """Weights that arrive in bfloat16 (a bf16 import being fine-tuned; built here directly,
    past the config check) train as float32, and so do Adam's moments."""
    m = ModelConfig(**SMALL, dtype="bfloat16", param_dtype="bfloat16")
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    tx = make_optimizer(OptimConfig(), 10)
    _, state, _ = create_train_state(model_fn(m, 0), tx, mesh, "dp", 0)
    assert _float_dtypes(state.params) == _float_dtypes(state.opt_state) == {np.dtype("float32")}
    _, params, frozen = nnx.split(nnx.eval_shape(model_fn(m, 0)), nnx.Param, ...)
    params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), params)
    state, _ = fresh_train_state(params, frozen, tx, mesh, "dp", 0)
    assert _float_dtypes(state.params) == _float_dtypes(state.opt_state) == {np.dtype("float32")}


def test_updates_below_bf16_resolution_are_kept():
    """bf16 compute, f32 master weights: a step of lr 1e-6 moves the weights by about 1e-6,
    far below bfloat16's spacing near the weights (~1e-4), and the move is kept."""
    m = ModelConfig(**SMALL, dtype="bfloat16")
    opt = OptimConfig(lr=1e-6, warmup_steps=0, schedule="constant", weight_decay=0.0)
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    tx = make_optimizer(opt, 10)
    graphdef, state, sh = create_train_state(model_fn(m, 0), tx, mesh, "dp", 0)
    before = np.asarray(state.params["blocks"][0]["mlp"]["up"].get_value())
    step = make_train_step(graphdef, lm_loss(), tx, lr_schedule(opt, 10), sh, mesh, "dp")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, size=(4, 9)).astype(np.int32)
    batch = {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.arange(8, dtype=np.int32)[None].repeat(4, 0),
        "loss_mask": np.ones((4, 8), np.float32),
    }
    state, _ = step(state, to_global(batch, mesh))
    moved = np.abs(np.asarray(state.params["blocks"][0]["mlp"]["up"].get_value()) - before)
    assert 0.5e-6 < np.median(moved[moved > 0]) < 2e-6
    assert (moved > 0).mean() > 0.5


def test_bf16_logits_train_like_f32_logits():
    """`model.logits_dtype: bfloat16` writes the output layer in bf16 (the losses reduce in
    f32): the loss and the gradients of a bf16-compute model stay within bf16 rounding of the
    float32-logits model's, and the logits themselves are bf16."""
    cfgs = [ModelConfig(**SMALL, dtype="bfloat16", logits_dtype=t) for t in ("float32", "bfloat16")]
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 64, size=(2, 16)), jnp.int32)
    batch = {
        "tokens": tokens,
        "targets": jnp.roll(tokens, -1, axis=1),
        "positions": jnp.broadcast_to(jnp.arange(16), (2, 16)),
        "loss_mask": jnp.ones((2, 16), jnp.float32),
    }
    out = []
    for m in cfgs:
        model = model_fn(m, 0)()
        assert model(tokens, positions_BL=batch["positions"]).dtype == jnp.dtype(m.logits_dtype)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def f(p, graphdef=graphdef, rest=rest):
            return lm_loss()(nnx.merge(graphdef, p, rest), batch, None)[0]

        out.append(jax.value_and_grad(f)(params))
    (l32, g32), (l16, g16) = out
    np.testing.assert_allclose(float(l16), float(l32), rtol=2e-3)
    flat32, flat16 = (jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)]) for g in (g32, g16))
    rel = float(jnp.linalg.norm(flat16 - flat32) / jnp.linalg.norm(flat32))
    assert rel < 0.02, rel  # bf16 rounding of the logits' gradient: ~0.4 % per element
