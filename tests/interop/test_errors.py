"""Import errors for people (one line naming the file/tensor and what was expected), and a
torch-free export → import round trip. HF directories are written by our own exporter and then
broken on purpose, so these tests need neither torch nor transformers."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import MeshConfig, ModelConfig, from_dict
from jaxllm.errors import JaxllmError
from jaxllm.interop import InteropError, SafetensorsReader, to_model_config, write_safetensors
from jaxllm.interop.export import export_hf
from jaxllm.models import make_decoder
from jaxllm.sharding import make_mesh
from jaxllm.trainers.hf_import import build_state, import_hf
from jaxllm.trainers.lm import load_checkpoint_model

TINY_LLAMA = ModelConfig(
    vocab_size=64,
    d_model=32,
    n_layers=1,
    n_heads=4,
    n_kv_heads=2,
    d_ff=64,
    norm="rmsnorm",
    mlp="swiglu",
    positions="rope",
    use_bias=False,
    tie_embeddings=False,
    rope_theta=20000.0,
)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A valid llama-family HF directory written from a random jaxllm model."""
    out = tmp_path_factory.mktemp("hf") / "llama"
    export_hf(nnx.state(make_decoder(TINY_LLAMA, seed=1)), TINY_LLAMA, out)
    return out


def _copy_with(src: Path, dst: Path, edit) -> Path:
    """Copies an HF dir, passing its tensors (name → array) through `edit`."""
    dst.mkdir(parents=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    reader = SafetensorsReader(src)
    tensors = {n: np.array(reader.get(n)) for n in sorted(reader.names)}
    tensors = edit(tensors)
    specs = [(n, a.shape, a.dtype) for n, a in tensors.items()]
    write_safetensors(dst / "model.safetensors", specs, tensors.__getitem__)
    return dst


def _import_error(path: Path, tmp_path: Path) -> str:
    with pytest.raises(JaxllmError) as info:
        import_hf(path, tmp_path / "run", from_dict({"stage": "generate"}))
    assert isinstance(info.value, InteropError) or "hf.path" in str(info.value)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_missing_weights_file(hf_dir, tmp_path):
    d = tmp_path / "nofile"
    d.mkdir()
    (d / "config.json").write_text((hf_dir / "config.json").read_text())
    msg = _import_error(d, tmp_path)
    assert "model.safetensors" in msg and "not found" in msg


def test_missing_config(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    assert "config.json" in _import_error(d, tmp_path)


def test_missing_shard_of_index(hf_dir, tmp_path):
    d = tmp_path / "sharded"
    d.mkdir()
    (d / "config.json").write_text((hf_dir / "config.json").read_text())
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "model-00001-of-00002.safetensors" in _import_error(d, tmp_path)


def test_unsupported_architecture(hf_dir, tmp_path):
    d = _copy_with(hf_dir, tmp_path / "mistral", lambda t: t)
    conf = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**conf, "model_type": "mistral"}))
    msg = _import_error(d, tmp_path)
    assert "'mistral'" in msg and "llama, qwen2, gpt2" in msg


def test_missing_tensor(hf_dir, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    d = _copy_with(
        hf_dir, tmp_path / "missing", lambda t: {k: v for k, v in t.items() if k != name}
    )
    assert f"missing tensor '{name}'" in _import_error(d, tmp_path)


def test_unexpected_tensor(hf_dir, tmp_path):
    name = "model.layers.0.self_attn.o_proj.bias"
    d = _copy_with(hf_dir, tmp_path / "extra", lambda t: {**t, name: np.zeros(32, np.float32)})
    assert f"unexpected tensor '{name}'" in _import_error(d, tmp_path)


def test_shape_mismatch(hf_dir, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    d = _copy_with(hf_dir, tmp_path / "shape", lambda t: {**t, name: np.zeros((8, 32), np.float32)})
    msg = _import_error(d, tmp_path)
    assert f"'{name}' has shape (8, 32), expected (16, 32)" in msg


def test_unsupported_config_value():
    with pytest.raises(InteropError, match="rope type 'yarn' unsupported"):
        to_model_config({"model_type": "llama", "rope_scaling": {"rope_type": "yarn"}})
    with pytest.raises(InteropError, match="activation_function 'gelu'"):
        to_model_config({"model_type": "gpt2", "activation_function": "gelu"})
    with pytest.raises(InteropError, match="missing key 'hidden_size'"):
        to_model_config({"model_type": "qwen2", "num_attention_heads": 4, "vocab_size": 8})


def _flat(state) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def test_roundtrip_without_torch(hf_dir, tmp_path):
    """export → import → checkpoint gives back the same params; bf16 files read back too."""
    src = _flat(nnx.state(make_decoder(TINY_LLAMA, seed=1), nnx.Param))
    import_hf(hf_dir, tmp_path / "run", from_dict({"stage": "generate"}))
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    _, state, m, meta = load_checkpoint_model(tmp_path / "run" / "checkpoints", mesh)
    assert meta["step"] == 0 and m.kv_heads == 2 and m.rope_theta == 20000.0
    assert m.head_size == 8 and not m.tie_embeddings
    back = _flat(state)
    assert back.keys() == src.keys()
    for path, want in src.items():
        np.testing.assert_array_equal(back[path], want, err_msg=str(path))
    bf16 = export_hf(state, m, tmp_path / "bf16", dtype="bfloat16")
    reader = SafetensorsReader(bf16)
    assert reader.info("model.norm.weight")[1] == "BF16"
    q = reader.get("model.layers.0.self_attn.q_proj.weight").astype(np.float32)
    want_q = src[("blocks", 0, "attn", "q")].reshape(32, 32).T
    np.testing.assert_allclose(q, want_q, rtol=1e-2, atol=1e-6)


def test_import_places_params_on_fsdp_shards(hf_dir):
    """Each tensor goes straight onto its shards (embed axis split over 8 fsdp devices)."""
    cfg = from_dict({"stage": "generate", "mesh": {"data": 1, "fsdp": -1}})
    _, m = to_model_config(json.loads((hf_dir / "config.json").read_text()))
    state, _ = build_state(hf_dir, "llama", m, cfg)
    q = state.params["blocks"][0]["attn"]["q"].get_value()
    assert q.sharding.spec[0] == "fsdp" and len(q.addressable_shards) == 8
    assert q.addressable_shards[0].data.shape == (4, 4, 8)
    src = nnx.state(make_decoder(TINY_LLAMA, seed=1), nnx.Param)
    np.testing.assert_array_equal(
        np.asarray(q), np.asarray(src["blocks"][0]["attn"]["q"].get_value())
    )
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.shape == q.shape]
    assert moments and all(x.sharding == q.sharding for x in moments)
