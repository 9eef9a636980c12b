"""LoRA adapters: parameter counts, zero start, the x·A·B formula, merge equality, sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import ModelConfig, PeftConfig
from jaxllm.models import make_decoder
from jaxllm.models.lora import apply_lora, merge_lora
from jaxllm.trainers.lm import trainable_filter

SMALL = ModelConfig(
    vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=32,
    positions="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False,
)  # fmt: skip
ALL = (r"attn\.(q|k|v|o)$", r"mlp\.(up|gate|down)$", r"^head$")


def lora(model, rank=4, targets=ALL, alpha=8.0, seed=1):
    with nnx.use_eager_sharding(False):
        return apply_lora(model, PeftConfig("lora", rank, alpha, 0.0, targets), nnx.Rngs(seed))


def randomize_b(model, seed=3):
    """B starts at zero; give it values so the adapters change the output."""
    for i, (path, var) in enumerate(nnx.iter_graph(model)):
        if isinstance(var, nnx.LoRAParam) and str(path[-1]).endswith("_lora_b"):
            var[...] = 0.05 * jax.random.normal(jax.random.key(seed + i), var.shape, var.dtype)


def trainable_count(model, peft) -> int:
    state = nnx.state(model, trainable_filter(peft))
    return sum(int(x.size) for x in jax.tree.leaves(state))


def test_classic_count_1024x512_rank8():
    m = ModelConfig(vocab_size=16, d_model=1024, n_layers=1, n_heads=8, d_ff=512, max_seq_len=8)
    model = nnx.eval_shape(lambda: make_decoder(m))
    peft = PeftConfig("lora", rank=8, targets=(r"mlp\.up$",))
    with nnx.use_eager_sharding(False):
        paths = apply_lora(model, peft, nnx.Rngs(0))
    assert paths == ["blocks.0.mlp.up"]
    assert model.blocks[0].mlp.up.shape == (1024, 512)
    assert trainable_count(model, peft) == 12_288  # (1024 + 512) * 8


def test_adapters_start_at_zero_and_follow_the_formula():
    model = make_decoder(SMALL)
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, SMALL.vocab_size)
    base = model(tokens)
    lora(model)
    np.testing.assert_array_equal(model(tokens), base)  # B = 0: exactly the base model
    randomize_b(model)
    mlp = model.blocks[0].mlp
    x = np.asarray(jax.random.normal(jax.random.key(5), (3, SMALL.d_model)), np.float64)
    w, a, b = (np.asarray(v[...], np.float64) for v in (mlp.up, mlp.up_lora_a, mlp.up_lora_b))
    expect = x @ w + (8.0 / 4) * (x @ a) @ b
    from jaxllm.models.layers import project

    got = project(mlp, "up", jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(model(tokens) - base).max()) > 1e-3


def test_merge_equals_adapted_model():
    model = make_decoder(SMALL)
    paths = lora(model)
    assert len(paths) == SMALL.n_layers * 7 + 1  # q k v o up gate down per block, the head
    randomize_b(model)
    tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, SMALL.vocab_size)
    adapted = model(tokens)
    assert merge_lora(model) == len(paths)
    assert not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
    np.testing.assert_allclose(model(tokens), adapted, atol=1e-5, rtol=1e-5)


def test_merging_into_a_bf16_base_keeps_the_whole_update():
    model = make_decoder(dataclasses.replace(SMALL, param_dtype="bfloat16"))
    lora(model, targets=(r"mlp\.up$",))
    randomize_b(model)
    mlp = model.blocks[0].mlp
    w, a, b = (np.asarray(v[...].astype(jnp.float32), np.float64)
               for v in (mlp.up, mlp.up_lora_a, mlp.up_lora_b))  # fmt: skip
    merge_lora(model)
    assert mlp.up.dtype == jnp.float32  # bf16 would round away most of the small update
    np.testing.assert_allclose(mlp.up[...], w + (8.0 / 4) * a @ b, rtol=1e-6, atol=1e-7)


def test_only_adapters_train_and_shard_with_their_weight():
    model = make_decoder(SMALL)
    peft = PeftConfig("lora", rank=4, targets=ALL)
    lora(model, targets=ALL)
    trainable = nnx.state(model, trainable_filter(peft))
    names = {str(path[-1]) for path, _ in nnx.to_flat_state(trainable)}
    assert len(names) == 16 and all(n.endswith(("_lora_a", "_lora_b")) for n in names)
    q = model.blocks[0].attn
    assert q.q_lora_a.get_metadata()["out_sharding"] == ("embed", None)
    assert q.q_lora_b.get_metadata()["out_sharding"] == (None, "heads", "head_dim")
    assert q.o_lora_a.get_metadata()["out_sharding"] == ("heads", "head_dim", None)


def test_patterns_matching_nothing_fail_clearly():
    with pytest.raises(ValueError, match="match no dense weight"):
        lora(make_decoder(SMALL), targets=(r"attention\.query",))
