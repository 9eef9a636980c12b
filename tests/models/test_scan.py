"""Scan over layers (`model.scan_layers`): the scanned model is the unrolled one with its
block weights stacked — same init, same logits, loss and gradients (dropout and every remat
policy), same greedy generations, LoRA, parameter count, sharded train steps, HF export — and
its compiled program does not grow with depth."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import MeshConfig, ModelConfig, PeftConfig, replace
from jaxllm.generation import Sampler
from jaxllm.models import make_decoder, param_count
from jaxllm.models.lora import apply_lora, merge_lora
from jaxllm.models.scan import stack_layers, unstack_layers
from jaxllm.training.optim import decay_mask

N = 3
CFG = ModelConfig(
    vocab_size=64, d_model=32, n_layers=N, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
    dropout=0.1, init_std=0.2,
)  # fmt: skip
LLAMA = replace(
    CFG, norm="rmsnorm", mlp="swiglu", positions="rope", use_bias=False, tie_embeddings=False
)
TOKENS = np.random.default_rng(0).integers(0, 64, size=(2, 12)).astype(np.int32)


def pair(cfg: ModelConfig, seed: int = 0):
    """(graphdef, state) of the unrolled and of the scanned model from the same seed."""
    return (
        nnx.split(make_decoder(cfg, seed)),
        nnx.split(make_decoder(replace(cfg, scan_layers=True), seed)),
    )


def flat(state) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def assert_same(a, b, **tol):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_allclose(fa[k], fb[k], err_msg=str(k), **tol)


@pytest.mark.parametrize("cfg", [CFG, LLAMA], ids=["gpt2", "llama"])
def test_scanned_init_is_the_unrolled_init_stacked(cfg):
    (_, su), (_, ss) = pair(cfg)
    stacked = stack_layers(su, N)
    assert_same(stacked, ss, rtol=0, atol=0)
    assert jax.tree.structure(stacked) == jax.tree.structure(ss)  # metadata too
    assert jax.tree.structure(unstack_layers(ss, N)) == jax.tree.structure(su)
    q = ss["blocks"]["attn"]["q"]
    assert q.shape == (N, 32, 4, 8) and q.get_metadata()["out_sharding"][0] == "layers"
    abstract = nnx.eval_shape(lambda: make_decoder(replace(cfg, scan_layers=True)))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert n == param_count(cfg)
    # weight decay picks the same weights (stacked biases and norm scales are 2-D now)
    unrolled_mask = {
        (p[:1] + p[2:] if p[0] == "blocks" else p): v.get_value()
        for p, v in nnx.to_flat_state(decay_mask(su))
    }
    assert {p: v.get_value() for p, v in nnx.to_flat_state(decay_mask(ss))} == unrolled_mask


# the remat policies scanned are slow-set cases (17 s each); each policy's equivalence to no
# remat is also a fast test of one unrolled layer (tests/models/test_decoder.py)
@pytest.mark.parametrize(
    "remat", ["none", *(pytest.param(r, marks=pytest.mark.slow) for r in ("full", "dots"))]
)
def test_same_loss_and_grads_with_dropout_and_remat(remat):
    """Dropout on (per-layer keys `fold_in(key, i)`, as unrolled) and each remat policy."""
    (gu, su), (gs, ss) = pair(replace(LLAMA, remat=remat))

    def loss(graphdef, state):
        logits = nnx.merge(graphdef, state)(TOKENS, deterministic=False, key=jax.random.key(3))
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    grad = jax.jit(jax.value_and_grad(loss, 1), static_argnums=0)
    lu, gru = grad(gu, su)
    ls, grs = grad(gs, ss)
    np.testing.assert_allclose(float(ls), float(lu), rtol=1e-6)
    # float32 summation order differs between the fused loop and the unrolled program
    assert_same(unstack_layers(grs, N), gru, rtol=1e-5, atol=1e-6)
    logits_u = nnx.merge(gu, su)(TOKENS)
    np.testing.assert_allclose(nnx.merge(gs, ss)(TOKENS), logits_u, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [CFG, LLAMA], ids=["gpt2", "llama"])
def test_sampler_gives_the_same_greedy_tokens(cfg):
    (gu, su), (gs, ss) = pair(cfg)
    prompts = [[5, 17, 3], [1, 2, 3, 4, 5, 6, 7], [42]]
    kw = {"max_new_tokens": 6, "key": jax.random.key(0)}
    want = Sampler(gu)(su, prompts, **kw)
    got = Sampler(gs)(ss, prompts, **kw)
    assert got.tokens == want.tokens
    np.testing.assert_allclose(
        np.concatenate(got.logprobs), np.concatenate(want.logprobs), atol=1e-5
    )


def test_lora_on_scanned_layers():
    """Adapters get the `layers` axis; with the unrolled adapters stacked in, the outputs
    match, and merging folds each layer's own A·B into its weight."""
    peft = PeftConfig("lora", 2, 4.0, 0.0, (r"attn\.(q|o)$", r"mlp\.down$"))
    unrolled = make_decoder(LLAMA)
    scanned = make_decoder(replace(LLAMA, scan_layers=True))
    with nnx.use_eager_sharding(False):
        assert apply_lora(scanned, peft, nnx.Rngs(1)) == [
            "blocks.attn.q", "blocks.attn.o", "blocks.mlp.down",
        ]  # fmt: skip
        apply_lora(unrolled, peft, nnx.Rngs(1))
    a = scanned.blocks.attn.o_lora_a
    assert a.shape == (N, 4, 8, 2) and a.get_metadata()["out_sharding"][0] == "layers"
    lora_u = nnx.state(unrolled, nnx.LoRAParam)
    lora_u = jax.tree.map(lambda x: x + 0.05 * jnp.cos(jnp.arange(x.size)).reshape(x.shape), lora_u)
    nnx.update(unrolled, lora_u)
    nnx.update(scanned, stack_layers(lora_u, N))
    want = unrolled(TOKENS)
    np.testing.assert_allclose(scanned(TOKENS), want, rtol=1e-5, atol=1e-5)
    assert merge_lora(scanned) == 3 and merge_lora(unrolled) == 3 * N
    assert_same(unstack_layers(nnx.state(scanned), N), nnx.state(unrolled), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(scanned(TOKENS), want, rtol=1e-5, atol=1e-5)


def test_lora_patterns_with_a_layer_index_name_the_scanned_paths():
    scanned = make_decoder(replace(LLAMA, scan_layers=True))
    with pytest.raises(ValueError, match="'blocks.attn.q', no layer index"):
        apply_lora(scanned, PeftConfig("lora", 2, 4.0, 0.0, (r"blocks\.0\.attn\.q$",)), None)


def test_sharded_train_steps_match_unrolled():
    """FSDP + TP on 8 devices: the stacked weights shard like the unrolled ones (plus a
    replicated `layers` axis) and the losses are the unrolled model's."""
    from tests.training.test_step import MODEL, losses

    mesh = MeshConfig(2, 2, 2, rules="fsdp_tp")
    ref, _, _ = losses(mesh, jax.devices(), n=3)
    got, state, _ = losses(mesh, jax.devices(), n=3, model=replace(MODEL, scan_layers=True))
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    q = state.params["blocks"]["attn"]["q"].get_value()
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)


def test_program_size_does_not_grow_with_depth():
    """The lowered train-step program of a scanned model is the same size for 2 and 8
    layers (one block in a loop); an unrolled one grows with every layer."""

    def size(n: int, scan: bool) -> int:
        cfg = replace(CFG, n_layers=n, scan_layers=scan, remat="full")
        graphdef, state = nnx.split(make_decoder(cfg))

        def loss(state):
            return jnp.mean(nnx.merge(graphdef, state)(TOKENS))

        return len(jax.jit(jax.grad(loss)).lower(state).as_text())

    assert abs(size(8, True) - size(2, True)) < 0.02 * size(2, True)
    assert size(8, False) > 2 * size(2, False)


def test_hf_export_of_a_scanned_model_equals_the_unrolled(tmp_path):
    from jaxllm.interop import InteropError, SafetensorsReader, load_hf_params
    from jaxllm.interop.export import export_hf

    (_, su), (_, ss) = pair(LLAMA)
    a = export_hf(su, LLAMA, tmp_path / "unrolled")
    b = export_hf(ss, replace(LLAMA, scan_layers=True), tmp_path / "scanned")
    ra, rb = SafetensorsReader(a), SafetensorsReader(b)
    assert ra.names == rb.names
    for name in ra.names:
        np.testing.assert_array_equal(rb.get(name), ra.get(name), err_msg=name)
    with pytest.raises(InteropError, match="model.scan_layers: false"):
        load_hf_params(a, "llama", replace(LLAMA, scan_layers=True), None, None)
