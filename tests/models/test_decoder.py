"""Decoder: shapes, packing, parameter counts, tying, dropout, dtypes, remat and the KV cache."""

import functools
import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from jaxllm.config import ModelConfig
from jaxllm.models import Decoder, make_decoder, param_count, train_flops_per_token
from jaxllm.sharding.rules import RULES, use_rules

V = 80  # distinct from every other dimension
BASE = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64)
CONFIGS = {
    "gpt2": ModelConfig(**BASE),  # layernorm + gelu + learned positions + biases, tied
    "llama": ModelConfig(
        **BASE,
        norm="rmsnorm",
        mlp="swiglu",
        positions="rope",
        n_kv_heads=2,
        use_bias=False,
        tie_embeddings=False,
    ),  # fmt: skip
    "mqa": ModelConfig(**BASE, positions="sinusoidal", n_kv_heads=1, use_bias=False),
}


@functools.cache
def model(name: str, **overrides) -> tuple[nnx.GraphDef, nnx.State]:
    cfg = CONFIGS[name]
    if overrides:
        cfg = ModelConfig(**{**cfg.__dict__, **overrides})
    return nnx.split(make_decoder(cfg, seed=0))


@functools.cache
def forward_fn(graphdef: nnx.GraphDef, deterministic: bool = True):
    def run(state, tokens, positions, segments, key):
        m = nnx.merge(graphdef, state)
        return m(
            tokens, positions_BL=positions, segment_ids_BL=segments,
            deterministic=deterministic, key=key,
        )  # fmt: skip

    return jax.jit(run)


def forward(name, tokens, positions=None, segments=None, **kw):
    graphdef, state = model(name, **kw)
    return forward_fn(graphdef)(state, tokens, positions, segments, None)


def packed_batch(vocab: int):
    """Row 0 packs doc A (7 tokens) and doc B (9); rows 1 and 2 hold A and B alone."""
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, vocab, 7), rng.integers(0, vocab, 9)
    tokens = np.zeros((3, 16), np.int32)
    tokens[0] = np.concatenate([a, b])
    tokens[1, :7], tokens[2, :9] = a, b
    positions = np.zeros((3, 16), np.int32)
    positions[0] = np.concatenate([np.arange(7), np.arange(9)])
    positions[1:] = np.arange(16)
    segments = np.zeros((3, 16), np.int32)
    segments[0] = [1] * 7 + [2] * 9
    segments[1, :7], segments[2, :9] = 1, 1
    return tokens, positions, segments


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_shapes_finite_and_packing(name):
    tokens, positions, segments = packed_batch(V)
    logits = np.asarray(forward(name, tokens, positions, segments))
    assert logits.shape == (3, 16, V) and logits.dtype == np.float32
    assert np.isfinite(logits).all()
    # each packed document's logits equal those of the document run alone
    np.testing.assert_allclose(logits[0, :7], logits[1, :7], atol=1e-5)
    np.testing.assert_allclose(logits[0, 7:], logits[2, :9], atol=1e-5)


PARAM_CONFIGS = [
    ModelConfig(**BASE),
    ModelConfig(**{**BASE, "n_kv_heads": 2, "tie_embeddings": False, "qkv_bias": True,
                   "use_bias": False, "mlp": "swiglu", "norm": "rmsnorm", "positions": "rope"}),
    ModelConfig(**{**BASE, "n_kv_heads": 1, "positions": "sinusoidal", "head_dim": 16}),
    ModelConfig(**{**BASE, "use_bias": False, "mlp": "swiglu", "tie_embeddings": False}),
]  # fmt: skip


@pytest.mark.parametrize("cfg", PARAM_CONFIGS)
def test_param_count_matches_module(cfg):
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    assert param_count(cfg) == sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    non_embed = {
        k: v for k, v in nnx.to_flat_state(params) if k[0] not in ("embed", "pos_embed", "head")
    }
    n = sum(math.prod(v.shape) for v in non_embed.values())
    assert param_count(cfg, exclude_embeddings=True) == n


def test_train_flops_per_token_by_hand():
    cfg = ModelConfig(**{**BASE, "n_kv_heads": 2, "use_bias": False, "norm": "rmsnorm"})
    d, f, v = 32, 64, V
    block = (
        d * d + 2 * d * 16 + d * d + 2 * d * f + 2 * d
    )  # q, k+v (2 kv heads of 8), o, mlp, norms
    n = 2 * block + d + d * v  # + final norm + output matmul
    assert train_flops_per_token(cfg, 128) == 6 * n + 12 * 2 * 32 * 128


def test_init_statistics():
    _, state = model("gpt2")
    flat = {".".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(state)}
    for name, w in flat.items():
        if name.endswith("bias"):
            assert (w == 0).all(), name
        elif name.endswith("scale"):
            assert (w == 1).all(), name
    emb = flat["embed.embedding"]
    assert abs(emb.std() - 0.02) < 0.002
    out_std = 0.02 / math.sqrt(2 * 2)  # GPT-2 residual projection scaling, 2 layers
    o = np.concatenate([flat["blocks.0.attn.o"].ravel(), flat["blocks.0.mlp.down"].ravel()])
    assert abs(o.std() - out_std) < 0.1 * out_std


def test_weights_carry_logical_axes():
    _, state = model("llama")
    specs = {
        ".".join(map(str, k)): v.get_metadata()["out_sharding"] for k, v in nnx.to_flat_state(state)
    }
    assert specs["embed.embedding"] == ("vocab", "embed")
    assert specs["head"] == ("embed", "vocab")
    assert specs["blocks.0.attn.q"] == ("embed", "heads", "head_dim")
    assert specs["blocks.0.attn.k"] == ("embed", "kv_heads", "head_dim")
    assert specs["blocks.0.attn.o"] == ("heads", "head_dim", "embed")
    assert specs["blocks.0.mlp.gate"] == ("embed", "mlp")
    assert specs["blocks.0.mlp.down"] == ("mlp", "embed")
    assert specs["final_norm.scale"] == ("norm",)


def test_runs_under_a_mesh_with_sharding_rules():
    """Created under `jax.set_mesh` + logical rules, and run with activation constraints."""
    cfg = CONFIGS["mqa"]
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    # flax leaves names missing from the rules as mesh axes, so every weight axis is listed
    names = ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm")
    rules = [(n, RULES["fsdp_tp"].get(n)) for n in names]
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    assert nnx.state(abstract, nnx.Param)["embed"]["embedding"].shape == (V, 32)
    tokens, positions, segments = packed_batch(V)
    graphdef, state = model("mqa")
    with use_rules(mesh, "fsdp_tp"):
        logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
    np.testing.assert_allclose(logits, forward("mqa", tokens), atol=1e-5)


def _logits_without_row(name, row):
    """Logits after zeroing one row of the token embedding table."""
    graphdef, state = model(name)
    state = jax.tree.map(lambda x: x, state)  # a copy to edit
    state["embed"]["embedding"][...] = state["embed"]["embedding"][...].at[row].set(0.0)
    return np.asarray(forward_fn(graphdef)(state, packed_batch(V)[0], None, None, None))


def test_tied_embeddings_share_one_array():
    graphdef, state = model("gpt2")
    vocab_sized = [x for x in jax.tree.leaves(state) if V in x.shape and x.shape != (V, 32)]
    assert vocab_sized == [] and "head" not in state  # no separate output matrix
    tokens = packed_batch(V)[0]
    unused = next(t for t in range(V) if t not in tokens)
    # zeroing an unused token's embedding row zeroes its logit column iff the output layer is
    # that same table (no output bias); with an untied head nothing changes
    tied = _logits_without_row("gpt2", unused)
    assert (tied[..., unused] == 0).all() and np.abs(tied).max() > 0
    untied = _logits_without_row("llama", unused)
    np.testing.assert_array_equal(untied, np.asarray(forward("llama", tokens)))


def test_dropout_only_in_training():
    tokens, positions, segments = packed_batch(V)
    graphdef, state = model("gpt2", dropout=0.2)
    train = forward_fn(graphdef, deterministic=False)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    a = train(state, tokens, positions, segments, k1)
    b = train(state, tokens, positions, segments, k1)
    c = train(state, tokens, positions, segments, k2)
    evaluation = forward_fn(graphdef)(state, tokens, positions, segments, k1)
    np.testing.assert_array_equal(a, b)  # same key, same mask
    assert not np.allclose(a, c) and not np.allclose(a, evaluation)
    np.testing.assert_allclose(evaluation, forward("gpt2", tokens, positions, segments), atol=1e-6)
    with pytest.raises(ValueError, match="key"):
        forward_fn(graphdef, deterministic=False)(state, tokens, positions, segments, None)


def test_bfloat16_compute_is_close_to_float32():
    tokens, positions, segments = packed_batch(V)
    ref = np.asarray(forward("llama", tokens, positions, segments))
    low = forward("llama", tokens, positions, segments, dtype="bfloat16")
    assert low.dtype == jnp.float32  # logits stay float32
    np.testing.assert_allclose(np.asarray(low), ref, atol=0.05 * np.abs(ref).max())
    assert not np.array_equal(np.asarray(low), ref)  # it really ran in bfloat16
    cfg = ModelConfig(**{**CONFIGS["llama"].__dict__, "param_dtype": "bfloat16"})
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(abstract)))


def _mixed_dots(jaxpr) -> list[str]:
    """dot_generals (at any depth of the jaxpr) whose two operands differ in dtype."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            a, b = (v.aval.dtype for v in eqn.invars)
            if a != b:
                found.append(f"{a} x {b}")
    for sub in jax.extend.core.subjaxprs(jaxpr):
        found += _mixed_dots(sub)
    return found


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_accelerator_backward_runs_the_output_layer_in_bf16(monkeypatch, name):
    """On GPU/TPU (here: the backend check answering "gpu") a bf16 model's f32 logits must
    not make f32 GEMMs of the output layer's backward: autodiff fed the f32 cotangent into
    dots beside bf16 operands (the jaxpr check fails on that path: two mixed dots). The head's
    gradient stays h.T @ g, to bf16 rounding (the cotangent is rounded, as on the CPU path)."""
    cfg = ModelConfig(**{**CONFIGS[name].__dict__, "dtype": "bfloat16", "attention": "xla"})
    graphdef, state = nnx.split(make_decoder(cfg, seed=0))
    tokens = jnp.asarray(packed_batch(V)[0])
    rng = np.random.default_rng(0)
    g_logits = jnp.asarray(rng.normal(size=(*tokens.shape, V)), jnp.float32)

    def loss(s):  # d loss / d logits = g_logits exactly (f32)
        return jnp.sum(nnx.merge(graphdef, s)(tokens) * g_logits)

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert _mixed_dots(jax.make_jaxpr(jax.grad(loss))(state).jaxpr) == []
    grads = jax.jit(jax.grad(loss))(state)
    monkeypatch.undo()
    if cfg.tie_embeddings:  # the tied table's gradient also holds the input lookup's share
        return
    # reference: the head's gradient h.T @ g from the bf16 hidden states and the cotangent
    # rounded to bf16, in f32 numpy
    h = nnx.merge(graphdef, state).features(tokens).reshape(-1, 32)
    g = g_logits.astype(jnp.bfloat16).reshape(-1, V)
    want = np.asarray(h, np.float32).T @ np.asarray(g, np.float32)  # [D, V]
    got = np.asarray(grads["head"].get_value(), np.float32)
    np.testing.assert_allclose(got, want, atol=0.01 * np.abs(want).max())


@functools.cache
def remat_loss_and_grad(remat: str):
    """One layer (remat acts per block), so the backward compiles stay quick."""
    graphdef, state = model("llama", n_layers=1, remat=remat)
    tokens = jnp.asarray(packed_batch(V)[0])
    loss = lambda s: jnp.mean(nnx.merge(graphdef, s)(tokens) ** 2)  # noqa: E731
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(state))
    assert ("checkpoint" in jaxpr or "remat" in jaxpr) == (remat != "none")
    return jax.jit(jax.value_and_grad(loss))(state)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_same_loss_and_grads(remat):
    l0, g0 = remat_loss_and_grad("none")
    l1, g1 = remat_loss_and_grad(remat)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_kv_cache_logits_equal_full_forward(name):
    """Prefill (row 1 left-padded by 4) then 3 one-token steps give the full forward's logits."""
    graphdef, state = model(name)
    seq = np.random.default_rng(5).integers(0, V, (3, 16)).astype(np.int32)  # row 2 unused
    prompt = np.zeros((2, 6), np.int32)
    prompt[0], prompt[1, 4:] = seq[0, :6], seq[1, :2]
    seg = np.array([[1] * 6, [0] * 4 + [1] * 2], np.int32)
    pos = np.array([list(range(6)), [0] * 4 + [0, 1]], np.int32)

    @jax.jit
    def cached(state):
        m = nnx.merge(graphdef, state)
        logits, cache = m.extend(prompt, m.init_cache(2, 16), positions_BL=pos, segment_ids_BL=seg)
        outs = [logits[:, -1]]
        for t in range(3):
            step_pos = jnp.asarray([[6 + t], [2 + t]])
            tok = jnp.asarray([[seq[0, 6 + t]], [seq[1, 2 + t]]])
            logits, cache = m.extend(tok, cache, positions_BL=step_pos)
            outs.append(logits[:, 0])
        return jnp.stack(outs, axis=1)

    got = np.asarray(cached(state))
    full = np.asarray(forward(name, seq))
    np.testing.assert_allclose(got[0], full[0, 5:9], atol=1e-5)
    np.testing.assert_allclose(got[1], full[1, 1:5], atol=1e-5)


def test_vocab_size_must_be_set_and_length_checked():
    with pytest.raises(ValueError, match="vocab_size"):
        make_decoder(ModelConfig(), seed=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        forward("gpt2", np.zeros((1, 65), np.int32))


def test_param_keys_give_nnx_rngs_weights():
    """`ParamKeys` (the Python-side key counter models are built with) yields the weights
    `nnx.Rngs(seed)` would, leaf for leaf."""
    from flax import nnx

    from jaxllm.models import Decoder
    from jaxllm.models.layers import ParamKeys

    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16)
    with nnx.use_eager_sharding(False):
        a = nnx.state(Decoder(cfg, rngs=nnx.Rngs(7)), nnx.Param)
        b = nnx.state(Decoder(cfg, rngs=ParamKeys(7)), nnx.Param)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
