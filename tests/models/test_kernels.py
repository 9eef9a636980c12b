"""Attention kernels (models/kernels.py, models/splash.py) against the xla path and numpy.

cuDNN itself runs only on NVIDIA GPUs (bench/attention.py checks it there); on CPU we check
what feeds it: the packed-sequence table made from segment ids, and that attention
restricted by that table is the segment-masked attention. Splash runs here in Pallas's
interpret mode, also sharded over the 8 simulated devices.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm.config import MeshConfig, ModelConfig
from jaxllm.errors import ConfigError
from jaxllm.models import make_decoder
from jaxllm.models.attention import make_mask
from jaxllm.models.kernels import ATTENTION, resolve_attention, segment_runs
from jaxllm.sharding import make_mesh, use_rules


def np_runs(seg_L: np.ndarray, max_runs: int) -> tuple[list[int], list[int]]:
    """Starts and lengths of the runs of equal ids, the runs past max_runs merged."""
    starts = [i for i in range(len(seg_L)) if i == 0 or seg_L[i] != seg_L[i - 1]]
    starts = starts[:max_runs]
    ends = starts[1:] + [len(seg_L)]
    return starts, [e - s for s, e in zip(starts, ends)]


def packed(b: int, length: int, seed: int, max_docs: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, length), np.int32)
    for i in range(b):
        cuts = np.sort(rng.choice(np.arange(1, length), rng.integers(0, max_docs), False))
        bounds = [0, *cuts, length]
        for d, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            seg[i, lo:hi] = d + 1
        seg[i, length - rng.integers(0, length // 4) :] = 0  # a padded tail
    return seg


@pytest.mark.parametrize("max_runs", [1, 3, 8, 40])
def test_segment_runs_match_numpy(max_runs):
    seg = packed(6, 40, seed=max_runs)
    lengths, offsets = (np.asarray(a) for a in segment_runs(jnp.asarray(seg), max_runs))
    assert lengths.shape == (6, max_runs) and offsets.shape == (6, max_runs + 1)
    for i in range(6):
        starts, lens = np_runs(seg[i], max_runs)
        n = len(starts)
        np.testing.assert_array_equal(offsets[i, :n], starts)
        np.testing.assert_array_equal(lengths[i, :n], lens)
        assert (offsets[i, n:] == -1).all() and (lengths[i, n:] == -1).all()
        assert lengths[i, :n].sum() == 40  # every position is in one run


def table_mask(lengths: np.ndarray, offsets: np.ndarray, length: int) -> np.ndarray:
    """The mask cuDNN's packed causal attention applies: causal inside each listed run."""
    b = lengths.shape[0]
    mask = np.zeros((b, length, length), bool)
    for i in range(b):
        for start, n in zip(offsets[i], lengths[i]):
            if n > 0:
                block = np.tril(np.ones((n, n), bool))
                mask[i, start : start + n, start : start + n] = block
    return mask


def test_packed_table_gives_the_segment_mask_on_real_tokens():
    seg = packed(4, 48, seed=1)
    lengths, offsets = (np.asarray(a) for a in segment_runs(jnp.asarray(seg), 16))
    want = np.asarray(make_mask(jnp.arange(48), jnp.asarray(seg), jnp.arange(48), jnp.asarray(seg)))
    got = table_mask(lengths, offsets, 48)
    real = seg != 0
    np.testing.assert_array_equal(got[real], want[real])  # padding rows differ by design


def qkv(b=2, length=128, n=4, k=2, h=16, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(0), 3)
    return (
        jax.random.normal(keys[0], (b, length, n, h), dtype),
        jax.random.normal(keys[1], (b, length, k, h), dtype),
        jax.random.normal(keys[2], (b, length, k, h), dtype),
    )


def masked_grads(fn, q, k, v, seg):
    real = 1.0 if seg is None else (seg != 0)[..., None, None]

    def loss(q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v, seg)) * real)

    out = fn(q, k, v, seg) * real
    return out, jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("docs,length", [("none", 128), ("packed", 128), ("packed", 200)])
def test_splash_matches_xla_with_gqa_and_segments(docs, length):
    """200 positions are padded to the kernel's 256 and the padding's outputs dropped."""
    q, k, v = qkv(length=length)
    seg = None if docs == "none" else jnp.asarray(packed(2, length, seed=3))
    ref_out, ref_g = masked_grads(ATTENTION["xla"], q, k, v, seg)
    out, g = masked_grads(ATTENTION["splash"], q, k, v, seg)
    chex.assert_trees_all_close(out, ref_out, atol=2e-5)
    chex.assert_trees_all_close(g, ref_g, atol=5e-5)


def test_splash_under_a_sharded_mesh_runs_per_device_shards():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2, rules="fsdp_tp"))
    q, k, v = qkv(b=4, n=4, k=2)
    seg = jnp.asarray(packed(4, 128, seed=5))
    ref = ATTENTION["xla"](q, k, v, seg) * (seg != 0)[..., None, None]
    spec = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, "tensor", None))
    args = [jax.device_put(x, spec) for x in (q, k, v)]
    seg_s = jax.device_put(seg, NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None)))

    @jax.jit
    def run(q, k, v, seg):
        with use_rules(mesh, "fsdp_tp"):
            return ATTENTION["splash"](q, k, v, seg)

    out = run(*args, seg_s)
    assert out.sharding.is_equivalent_to(spec, 4)
    np.testing.assert_allclose(out * (seg != 0)[..., None, None], ref, atol=2e-5)


def cfg(**kw) -> ModelConfig:
    return dataclasses.replace(ModelConfig(vocab_size=64, d_model=32, n_heads=4, n_layers=2), **kw)


def test_resolve_attention_per_backend_and_dtype():
    bf16 = cfg(dtype="bfloat16")
    assert resolve_attention(cfg(), "cpu") == "xla"
    assert resolve_attention(bf16, "cpu") == "xla"
    assert resolve_attention(bf16, "gpu") == "cudnn"
    assert resolve_attention(cfg(), "gpu") == "xla"  # cuDNN flash needs 16-bit inputs
    assert resolve_attention(cfg(dtype="bfloat16", dropout=0.1), "gpu") == "xla"
    assert resolve_attention(cfg(), "tpu") == "splash"
    assert resolve_attention(cfg(attention="xla"), "tpu") == "xla"
    with pytest.raises(ConfigError, match="'model.attention': 'cudnn' needs a GPU"):
        resolve_attention(cfg(attention="cudnn", dtype="bfloat16"), "cpu")
    with pytest.raises(ConfigError, match="cudnn needs dtype bfloat16 or float16"):
        resolve_attention(cfg(attention="cudnn"), "gpu")
    with pytest.raises(ConfigError, match="'splash' needs a TPU"):
        resolve_attention(cfg(attention="splash"), "gpu")


def test_cudnn_needs_an_ampere_or_newer_gpu(monkeypatch):
    """A T4 (7.5) or V100 (7.0) has no cuDNN fused attention: auto falls back to xla, an
    explicit cudnn names the capability; 8.0 and up (A100, L4, H100) take cudnn. On jax's own
    GPU backend the capability is read from the device (here faked)."""
    bf16 = cfg(dtype="bfloat16")
    for cap, want in (("7.5", "xla"), ("7.0", "xla"), ("8.0", "cudnn"), ("8.9", "cudnn"),
                      ("9.0", "cudnn"), ("10.0", "cudnn"), ("gfx90a", "xla"), ("", "xla")):  # fmt: skip
        assert resolve_attention(bf16, "gpu", cap) == want, cap
    with pytest.raises(ConfigError, match="compute capability 8.0 or newer .* reports 7.5; use"):
        resolve_attention(cfg(attention="cudnn", dtype="bfloat16"), "gpu", "7.5")

    class T4:
        compute_capability = "7.5"

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *a: [T4()])
    assert resolve_attention(bf16) == "xla"
    T4.compute_capability = "9.0"
    assert resolve_attention(bf16) == "cudnn"


def test_cudnn_needs_a_head_size_it_has_kernels_for():
    """cuDNN's flash attention takes head sizes that are multiples of 8, up to 128 before
    Hopper and 256 from it (jax's check_is_flash_attention): auto falls back to xla, an
    explicit cudnn names the size."""
    for head, cap, want in ((64, "8.0", "cudnn"), (128, "8.0", "cudnn"), (160, "8.0", "xla"),
                            (160, "9.0", "cudnn"), (256, "9.0", "cudnn"), (264, "9.0", "xla"),
                            (60, "9.0", "xla"), (160, None, "cudnn")):  # fmt: skip
        m = cfg(dtype="bfloat16", head_dim=head)
        assert resolve_attention(m, "gpu", cap) == want, (head, cap)
    assert resolve_attention(cfg(dtype="bfloat16", head_dim=60), "tpu") == "splash"
    with pytest.raises(ConfigError, match="multiple of 8 and at most 128, this model's is 160"):
        resolve_attention(cfg(attention="cudnn", dtype="bfloat16", head_dim=160), "gpu", "8.6")


def test_decoder_with_a_fused_kernel_gives_the_xla_logits():
    """The module's dispatch: the same model with its attention layers switched to splash
    (interpret mode) gives the same logits on real tokens, packed rows included."""
    m = cfg(positions="rope", n_kv_heads=2, max_seq_len=128)
    model = make_decoder(m, seed=0)
    tokens = jax.random.randint(jax.random.key(1), (2, 128), 0, 64)
    seg = jnp.asarray(packed(2, 128, seed=7))
    ref = model(tokens, segment_ids_BL=seg)
    for block in model.blocks:
        block.attn.kernel = "splash"
    out = model(tokens, segment_ids_BL=seg)
    real = np.asarray(seg) != 0
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=5e-5)
    graphdef, state = nnx.split(model)
    assert nnx.merge(graphdef, state).blocks[0].attn.kernel == "splash"


def _primitives(fn, *args) -> set[str]:
    from jax.extend.core import ClosedJaxpr, Jaxpr

    names: set[str] = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            if eqn.primitive.name == "reshape" and eqn.outvars[0].aval.shape[-1:] == (32,):
                names.add("reshape_to_32")
            for p in eqn.params.values():
                for sub in p if isinstance(p, (tuple, list)) else (p,):
                    if isinstance(sub, ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, Jaxpr):
                        walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return names


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_cpu_layout_tricks_only_on_cpu(backend, monkeypatch):
    """Optimization barriers (attention, dense) and 32-wide vocabulary reductions (losses)
    are for XLA:CPU; traced for another backend the step is the plain program."""
    from jaxllm.models.attention import attend
    from jaxllm.models.layers import dense
    from jaxllm.training.losses import cross_entropy

    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    q, k, v = qkv(length=256)
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    mask = make_mask(
        jnp.arange(256),
        jnp.ones((2, 256), jnp.int32),
        jnp.arange(256),
        jnp.ones((2, 256), jnp.int32),
    )
    logits, targets = jnp.ones((2, 8, 64)), jnp.zeros((2, 8), jnp.int32)
    x, w = jnp.ones((4, 8)), jnp.ones((8, 16))

    def step(q, k, v, logits, x, w):
        a = jax.grad(lambda q: jnp.sum(attend(q, k, v, mask, causal=True)))(q)
        c = jax.grad(lambda z: cross_entropy(z, targets, jnp.ones((2, 8)))[0])(logits)
        d = jax.grad(lambda w: jnp.sum(dense(x, w)))(w)
        return a, c, d

    names = _primitives(step, q, k, v, logits, x, w)
    on_cpu = backend == "cpu"
    assert ("optimization_barrier" in names) == on_cpu
    assert ("reshape_to_32" in names) == on_cpu


@pytest.mark.parametrize("scan", [False, True])
def test_prompt_tuning_with_a_fused_kernel_keeps_the_prompt_in_view(scan):
    """Every document attends to the prompt's virtual tokens (segment -1), which no fused
    kernel's segment masking expresses: with a prompt the layers run the xla path, so the
    logits equal xla's and the prompt still moves them (it was invisible under splash)."""
    from jaxllm.config import PeftConfig
    from jaxllm.models.peft import apply_peft

    m = cfg(positions="rope", max_seq_len=256, scan_layers=scan)
    model = make_decoder(m, seed=0)
    apply_peft(model, PeftConfig(method="prompt", num_virtual_tokens=8), nnx.Rngs(1))
    tokens = jax.random.randint(jax.random.key(1), (2, 120), 0, 64)  # 8 + 120: one block
    seg = jnp.asarray(packed(2, 120, seed=3))
    ref = np.asarray(model(tokens, segment_ids_BL=seg))
    layers = [model.blocks] if scan else list(model.blocks)
    for block in layers:
        block.attn.kernel = "splash"
    out = np.asarray(model(tokens, segment_ids_BL=seg))
    real = np.asarray(seg) != 0
    np.testing.assert_allclose(out[real], ref[real], atol=5e-5)
    noise = lambda x: x + jax.random.normal(jax.random.key(5), x.shape)  # noqa: E731
    nnx.update(model.prompt, jax.tree.map(noise, nnx.state(model.prompt)))
    moved = np.asarray(model(tokens, segment_ids_BL=seg))
    assert np.abs(moved - out).max(-1)[real].min() > 1e-3  # every real position sees it
