"""PEFT methods beyond LoRA on the decoder (models/peft): one variable type each, parameter
counts against the published formulas, where each starts (adapters: exactly the base;
prefix/prompt: not), the KV-cache path and greedy generation against the no-cache forward,
packed documents, scanned layers, folding the reparameterisations, stripping."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import ModelConfig, PeftConfig, replace
from jaxllm.generation import Sampler
from jaxllm.models import make_decoder
from jaxllm.models.layers import ParamKeys
from jaxllm.models.peft import PEFT_METHODS, apply_peft, fold_reparameterisations
from jaxllm.models.scan import is_stacked, stack_layers
from jaxllm.trainers.lm import trainable_filter

N = 2
LLAMA = ModelConfig(
    vocab_size=64, d_model=32, n_layers=N, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64,
    positions="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False, init_std=0.2,
)  # fmt: skip
GPT2 = ModelConfig(
    vocab_size=64, d_model=32, n_layers=N, n_heads=4, d_ff=48, max_seq_len=64, init_std=0.2
)
TOKENS = np.random.default_rng(0).integers(1, 64, size=(2, 11)).astype(np.int32)
P = 3
METHODS = {
    "adapter": PeftConfig("adapter", adapter_dim=4),
    "prefix": PeftConfig("prefix", num_virtual_tokens=P),
    "prefix_mlp": PeftConfig("prefix", num_virtual_tokens=P, prefix_projection=True,
                             prefix_hidden=8),
    "prompt": PeftConfig("prompt", num_virtual_tokens=P),
    "prompt_mlp": PeftConfig("prompt", num_virtual_tokens=P, prompt_encoder="mlp",
                             prompt_hidden=8),
}  # fmt: skip


def adapted(m: ModelConfig, name: str, seed: int = 1):
    model = make_decoder(m)
    with nnx.use_eager_sharding(False):
        apply_peft(model, METHODS[name], nnx.Rngs(seed))
    return model


def perturb(model, variable, scale: float = 0.1) -> None:
    """Moves every variable of the method away from its init (as training would)."""
    state = nnx.state(model, variable)
    bump = lambda x: x + scale * jnp.cos(jnp.arange(x.size, dtype=x.dtype)).reshape(x.shape)  # noqa: E731
    nnx.update(model, jax.tree.map(bump, state))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens_BL, seg_BL, pos_BL):
    return nnx.merge(graphdef, state)(tokens_BL, segment_ids_BL=seg_BL, positions_BL=pos_BL)


def fwd(model, tokens_BL, seg_BL=None, pos_BL=None) -> jax.Array:
    """The no-cache forward, compiled (eager dispatch of every small op is slow)."""
    return _forward(*nnx.split(model), jnp.asarray(tokens_BL), seg_BL, pos_BL)


def n_params(model, variable) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, variable)))


def test_one_variable_type_per_method_and_only_it_trains():
    types = [m.variable for m in PEFT_METHODS.values()]
    assert len(set(types)) == len(types) and all(issubclass(t, nnx.Param) for t in types)
    for name in ("adapter", "prefix", "prompt"):
        peft = METHODS[name]
        model = adapted(LLAMA, name)
        trained = {p for p, _ in nnx.to_flat_state(nnx.state(model, trainable_filter(peft)))}
        own = nnx.state(model, PEFT_METHODS[peft.method].variable)
        assert trained and trained == {p for p, _ in nnx.to_flat_state(own)}


# d 32, 2 layers; LLAMA has 2 kv heads of 8 (K·H = 16), GPT2 4 heads of 8 (K·H = d)
@pytest.mark.parametrize(
    "m, name, want",
    [
        (GPT2, "adapter", N * 2 * (2 * 32 * 4 + 32 + 4)),  # 2·d·m + d + m per adapter
        (GPT2, "prefix", N * 2 * P * 32),  # L·2·n_virtual·d
        (LLAMA, "prefix", N * 2 * P * 16),  # L·2·n_virtual·(K·H) with grouped kv heads
        (GPT2, "prefix_mlp", P * 32 + 32 * 8 + 8 + 8 * N * 2 * 32 + N * 2 * 32),
        (GPT2, "prompt", P * 32),  # n_virtual·d
        (GPT2, "prompt_mlp", P * 32 + 2 * 32 * 8 + 8 + 32),
    ],
)
def test_parameter_counts_follow_the_published_formulas(m, name, want):
    model = adapted(m, name)
    method = PEFT_METHODS[METHODS[name].method]
    assert n_params(model, method.variable) == want == method.count(model, METHODS[name])


def test_adapters_start_exactly_at_the_base_model_and_prefix_prompt_do_not():
    base = fwd(make_decoder(LLAMA), TOKENS)
    model = adapted(LLAMA, "adapter")
    np.testing.assert_array_equal(fwd(model, TOKENS), base)  # up = 0: the base model exactly
    perturb(model, PEFT_METHODS["adapter"].variable)
    assert float(jnp.abs(fwd(model, TOKENS) - base).max()) > 1e-3
    for name in ("prefix", "prompt"):  # extra keys to attend to: not the base outputs
        assert float(jnp.abs(fwd(adapted(LLAMA, name), TOKENS) - base).max()) > 1e-3


@pytest.mark.parametrize("name", ["adapter", "prefix", "prompt_mlp"])
@pytest.mark.parametrize("m", [LLAMA, replace(GPT2, scan_layers=True)], ids=["rope", "scan"])
def test_kv_cache_path_matches_the_full_forward(m, name):
    model = adapted(m, name)
    perturb(model, PEFT_METHODS[METHODS[name].method].variable)
    want = fwd(model, TOKENS)
    graphdef, state = nnx.split(model)

    @jax.jit
    def cached(state):
        model = nnx.merge(graphdef, state)
        cache = model.init_cache(2, 16)
        pos = jnp.broadcast_to(jnp.arange(11, dtype=jnp.int32), (2, 11))
        first, cache = model.extend(TOKENS[:, :7], cache, positions_BL=pos[:, :7])
        rest, cache = model.extend(TOKENS[:, 7:], cache, positions_BL=pos[:, 7:])
        return jnp.concatenate([first, rest], 1), cache.index

    got, index = cached(state)
    assert int(index) == (0 if name == "adapter" else P) + 11  # the virtual slots come first
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def greedy_no_cache(model, prompt: list[int], n: int, length: int = 16) -> list[int]:
    """Greedy tokens from the full forward over the whole sequence each step (one row of
    `length` slots, the unused ones padding)."""
    seq = list(prompt)
    for _ in range(n):
        row = np.zeros((1, length), np.int32)
        row[0, : len(seq)] = seq
        seg = (np.arange(length) < len(seq)).astype(np.int32)[None]
        seq.append(int(jnp.argmax(fwd(model, row, seg)[0, len(seq) - 1])))
    return seq[len(prompt) :]


@pytest.mark.parametrize(
    "m, name",
    [(LLAMA, "prefix"), (LLAMA, "prompt"), (GPT2, "prefix"), (GPT2, "prompt_mlp")],
    ids=["rope-prefix", "rope-prompt", "learned-prefix", "learned-prompt_mlp"],
)
def test_greedy_generation_equals_the_no_cache_forward(m, name):
    model = adapted(m, name)
    perturb(model, PEFT_METHODS[METHODS[name].method].variable, 0.3)
    prompts = [[5, 17, 3], [1, 2, 3, 4, 5, 6, 7]]
    graphdef, state = nnx.split(model)
    got = Sampler(graphdef)(state, prompts, max_new_tokens=6, key=jax.random.key(0)).tokens
    assert got == [greedy_no_cache(model, p, 6) for p in prompts]


@pytest.mark.parametrize("name", ["prefix", "prompt"])
@pytest.mark.parametrize("m", [LLAMA, GPT2], ids=["rope", "learned"])
def test_each_packed_document_sees_the_virtual_slots_and_padding_is_unseen(m, name):
    """Row [doc a | doc b | padding] with positions restarting per document: doc b's logits
    are those of doc b alone (the virtual slots sit right before each document)."""
    model = adapted(m, name)
    a, b = TOKENS[0, :5], TOKENS[1, :4]
    row = np.concatenate([a, b, [0, 0]])[None].astype(np.int32)
    seg = np.array([[1] * 5 + [2] * 4 + [0] * 2], np.int32)
    pos = np.array([list(range(5)) + list(range(4)) + [0, 0]], np.int32)
    packed = fwd(model, row, seg, pos)
    assert packed.shape == (1, 11, 64)  # the real columns only
    np.testing.assert_allclose(packed[0, :5], fwd(model, a[None])[0], atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(packed[0, 5:9], fwd(model, b[None])[0], atol=2e-5, rtol=2e-5)
    base_b = fwd(make_decoder(m), b[None])[0]
    assert float(jnp.abs(packed[0, 5:9] - base_b).max()) > 1e-3  # and they do see them


@pytest.mark.parametrize("name", ["adapter", "prefix", "prompt"])
def test_scanned_layers_equal_unrolled(name):
    """Both rematerialised, so the remat paths take the method's inputs too."""
    m = replace(LLAMA, remat="full")
    unrolled = adapted(m, name)
    perturb(unrolled, PEFT_METHODS[METHODS[name].method].variable)
    scanned = adapted(replace(m, scan_layers=True), name)
    nnx.update(scanned, stack_layers(nnx.state(unrolled), N))
    np.testing.assert_allclose(fwd(scanned, TOKENS), fwd(unrolled, TOKENS), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", ["adapter", "prefix", "prompt"])
def test_scanned_models_hold_the_variables_stacked_per_layer(name):
    """With scan_layers a block's adapters carry the block weights' leading `layers` axis (N
    rows, logical axis LAYERS, so the scan slices them with the block), the prefixes are
    [N, P, K, H] (scanned alongside), and the counts equal the unrolled model's."""
    peft = METHODS[name]
    method = PEFT_METHODS[peft.method]
    scanned, unrolled = adapted(replace(GPT2, scan_layers=True), name), adapted(GPT2, name)
    count = n_params(scanned, method.variable)
    assert count == n_params(unrolled, method.variable) == method.count(scanned, peft)
    flat = nnx.to_flat_state(nnx.state(scanned, method.variable))
    in_blocks = [v for path, v in flat if path[0] == "blocks"]
    assert len(in_blocks) == (8 if name == "adapter" else 0)  # 2 adapters x 4 weights
    assert all(is_stacked(v) and v.shape[0] == N for v in in_blocks)
    if name == "prefix":
        assert [x.shape for x in scanned.prefix()] == [(N, P, 4, 8)] * 2


@pytest.mark.parametrize("name", ["adapter", "prefix_mlp", "prompt_mlp"])
def test_param_keys_and_nnx_rngs_attach_the_same_variables(name):
    """Models are built with ParamKeys (models/layers.py); a method attached with them draws
    the same values as with nnx.Rngs of the same seed."""
    variable = PEFT_METHODS[METHODS[name].method].variable
    with_rngs, with_keys = make_decoder(GPT2), make_decoder(GPT2)
    with nnx.use_eager_sharding(False):
        apply_peft(with_rngs, METHODS[name], nnx.Rngs(params=3))
        apply_peft(with_keys, METHODS[name], ParamKeys(3))
    a, b = nnx.state(with_rngs, variable), nnx.state(with_keys, variable)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name, plain", [("prefix_mlp", "prefix"), ("prompt_mlp", "prompt")])
def test_folding_the_reparameterisation_keeps_the_outputs(name, plain):
    model = adapted(GPT2, name)
    perturb(model, PEFT_METHODS[METHODS[name].method].variable)
    want = fwd(model, TOKENS)
    assert fold_reparameterisations(model) == 1
    np.testing.assert_allclose(fwd(model, TOKENS), want, atol=1e-5, rtol=1e-5)
    method = PEFT_METHODS[METHODS[plain].method]
    assert n_params(model, method.variable) == method.count(model, METHODS[plain])


@pytest.mark.parametrize("name", ["adapter", "prefix", "prompt"])
def test_strip_gives_back_the_base_model(name):
    base = fwd(make_decoder(LLAMA), TOKENS)
    model = adapted(LLAMA, name)
    method = PEFT_METHODS[METHODS[name].method]
    perturb(model, method.variable)
    assert not method.mergeable and method.merge_or_strip(model) > 0
    assert not jax.tree.leaves(nnx.state(model, method.variable))
    np.testing.assert_array_equal(fwd(model, TOKENS), base)
