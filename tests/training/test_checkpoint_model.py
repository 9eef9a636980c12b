"""Loading a model from a checkpoint (a frozen reference / teacher / reward model, a
fine-tuning start, generation) reads its weights only: no optimizer state is restored, and
none is built on the devices before the restore."""

import gc
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import MeshConfig, ModelConfig, from_dict, to_dict
from jaxllm.sharding import make_mesh
from jaxllm.trainers.lm import init_from_checkpoint, load_frozen_model, model_fn
from jaxllm.training.checkpoint import Checkpointer
from jaxllm.training.optim import make_optimizer
from jaxllm.training.state import create_train_state

M = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16)


def _nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree) if isinstance(x, jax.Array))


def _save(directory: Path, cfg, state, meta: dict) -> Path:
    ckpt = Checkpointer(directory, async_save=False)
    ckpt.save(0, state, {"config": to_dict(cfg), "model": to_dict(M), **meta})
    ckpt.close()
    return directory


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(base checkpoint dir, its params, LoRA checkpoint dir, its adapters)."""
    tmp = tmp_path_factory.mktemp("ckpts")
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    cfg = from_dict({"stage": "pretrain", "model": to_dict(M)})
    tx = make_optimizer(cfg.train.optim, cfg.train.steps)
    _, state, _ = create_train_state(model_fn(M, 0), tx, mesh, "dp", 0)
    base = _save(tmp / "base", cfg, state, {})
    lcfg = from_dict(
        {
            "stage": "sft",
            "inputs": {"checkpoint": str(base)},
            "peft": {"method": "lora", "rank": 2},
            "loader": {"seq_len": 16},
        }
    )
    sp = init_from_checkpoint(lcfg, tx, mesh)
    adapters = jax.tree.map(lambda x: x + 0.01, sp.state.params)  # B != 0: they change W
    lora = _save(tmp / "lora", lcfg, sp.state.replace(params=adapters), {"base_checkpoint": base})
    return base, state.params, lora, adapters


@pytest.fixture
def restores(monkeypatch):
    """Each checkpoint read's (device bytes live when it starts, bytes it restored), through
    either `Checkpointer` restore method, measured from the live arrays before the load."""
    gc.collect()
    start = sum(x.nbytes for x in jax.live_arrays())
    calls: list[tuple[int, int]] = []

    def spy(method):
        def read(self, step, target):
            live = sum(x.nbytes for x in jax.live_arrays()) - start
            out = method(self, step, target)
            calls.append((live, _nbytes(out[0])))
            return out

        return read

    for name in ("restore", "restore_params"):
        if hasattr(Checkpointer, name):
            monkeypatch.setattr(Checkpointer, name, spy(getattr(Checkpointer, name)))
    return calls


def test_frozen_model_restores_weights_only(runs, restores):
    base, params, _, _ = runs
    mesh = make_mesh(MeshConfig(data=-1), jax.devices())
    _, state, _, _, _ = load_frozen_model(base, mesh, "fsdp")
    weights = _nbytes(params)
    assert restores == [(restores[0][0], weights)]  # one restore, of the weights' bytes
    assert restores[0][0] < weights  # no fresh train state (weights + 2 moments) before it
    for (_, a), (_, b) in zip(nnx.to_flat_state(state), nnx.to_flat_state(params)):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))
    assert state["blocks"][0]["attn"]["q"].get_value().sharding.spec[0] == "fsdp"


def test_lora_model_restores_base_weights_and_adapters_only(runs, restores):
    """A LoRA reference: the base's weights, then the adapters alone (not their moments),
    merged into plain weights equal to W + scale A B."""
    base, params, lora, adapters = runs
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    _, state, _, _, _ = load_frozen_model(lora, mesh)
    assert [r for _, r in restores] == [_nbytes(params), _nbytes(adapters)]
    q = params["blocks"][0]["attn"]["q"].get_value()
    a = adapters["blocks"][0]["attn"]["q_lora_a"].get_value()
    b = adapters["blocks"][0]["attn"]["q_lora_b"].get_value()
    want = q + (16.0 / 2) * np.tensordot(a, b, axes=1)
    got = state["blocks"][0]["attn"]["q"].get_value()
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_loading_a_missing_checkpoint_names_it_and_creates_nothing(tmp_path):
    from jaxllm.errors import ConfigError
    from jaxllm.trainers.checkpoint_model import load_checkpoint_model

    missing = tmp_path / "typo/checkpoints"
    with pytest.raises(ConfigError, match="typo/checkpoints: no such checkpoint directory"):
        load_checkpoint_model(missing, make_mesh(MeshConfig(data=-1)))
    assert not (tmp_path / "typo").exists()


def test_a_save_on_simulated_devices_runs_no_device_ops(tmp_path):
    """Arrays replicated over the host's 8 simulated devices are written whole from one
    replica: the save lowers no program (orbax's replica-parallel default would cut each array
    into 8 slices, an eager op per slice, compiled per shape), and restores the same values."""
    mesh = make_mesh(MeshConfig(data=-1))
    assert mesh.devices.size == 8
    rng = np.random.default_rng(0)
    values = {"a": rng.normal(size=(24, 37)), "b": rng.normal(size=(16, 5, 3))}
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = {k: jax.device_put(v.astype(np.float32), replicated) for k, v in values.items()}
    lowered: list[str] = []

    def count(event: str, _secs: float, **kw) -> None:
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            lowered.append(kw.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        ckpt = Checkpointer(tmp_path / "c", async_save=False)
        ckpt.save(3, state, {})
        ckpt.wait()
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert lowered == []
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state
    )
    out, _ = ckpt.restore(3, target)
    ckpt.close()
    for k, v in values.items():
        np.testing.assert_array_equal(np.asarray(out[k]), v.astype(np.float32))
