"""Attention core, masks, the attention module and RoPE against plain numpy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import ModelConfig, RopeScalingConfig
from jaxllm.models.attention import Attention, attend, make_mask
from jaxllm.models.layers import apply_rope, rope_angles, rope_inv_freq

# ------------------------------------------------------------------ numpy references


def np_mask(seg_BL: np.ndarray) -> np.ndarray:
    """Query l sees key s iff s <= l, same segment, and the segment is not padding (0)."""
    b, n = seg_BL.shape
    mask = np.zeros((b, n, n), bool)
    for i in range(b):
        for l_ in range(n):
            for s in range(l_ + 1):
                mask[i, l_, s] = seg_BL[i, l_] != 0 and seg_BL[i, s] == seg_BL[i, l_]
    return mask


def np_attention(q, k, v, mask):
    """Softmax attention head by head; query head h reads kv head h // (H / K) (HF repeat_kv)."""
    b, n, h, d = q.shape
    group = h // k.shape[2]
    out = np.zeros(q.shape, np.float64)
    for head in range(h):
        kh = head // group
        s = np.einsum("bld,bsd->bls", q[:, :, head], k[:, :, kh]) / math.sqrt(d)
        for i in range(b):
            for l_ in range(n):
                row = mask[i, l_]
                if not row.any():
                    continue  # padding query: defined as zeros
                e = np.exp(s[i, l_, row] - s[i, l_, row].max())
                out[i, l_, head] = (e / e.sum()) @ v[i, row, kh]
    return out


def np_rotate_half_rope(x_BLHD, positions_BL, inv_freq):
    """HF Llama: emb = cat(freqs, freqs); x * cos + rotate_half(x) * sin."""
    freqs = positions_BL[..., None].astype(np.float64) * inv_freq.astype(np.float64)
    emb = np.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    half = x_BLHD.shape[-1] // 2
    rotated = np.concatenate([-x_BLHD[..., half:], x_BLHD[..., :half]], axis=-1)
    return x_BLHD * np.cos(emb) + rotated * np.sin(emb)


def np_llama3_inv_freq(dim, theta, factor, low, high, old_len):
    """Llama 3.1's rope scaling, written element by element from the published formula."""
    out = []
    for i in range(0, dim, 2):
        f = 1.0 / theta ** (i / dim)
        wavelen = 2 * math.pi / f
        if wavelen < old_len / high:
            out.append(f)
        elif wavelen > old_len / low:
            out.append(f / factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return np.array(out)


# ------------------------------------------------------------------------------ tests

SEG = np.array([[1, 1, 1, 2, 2, 2, 2, 0], [0, 0, 3, 3, 3, 3, 3, 3]], np.int32)


def test_make_mask_matches_reference():
    slots = jnp.arange(SEG.shape[1])
    got = make_mask(slots, jnp.asarray(SEG), slots, jnp.asarray(SEG))
    np.testing.assert_array_equal(np.asarray(got), np_mask(SEG))


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_attend_matches_numpy(heads, kv_heads):
    rng = np.random.default_rng(0)
    b, n, d = SEG.shape[0], SEG.shape[1], 8
    q = rng.normal(size=(b, n, heads, d)).astype(np.float32)
    k = rng.normal(size=(b, n, kv_heads, d)).astype(np.float32)
    v = rng.normal(size=(b, n, kv_heads, d)).astype(np.float32)
    mask = np_mask(SEG)
    k_bksh, v_bksh = np.swapaxes(k, 1, 2), np.swapaxes(v, 1, 2)  # the cache layout
    got = np.asarray(jax.jit(attend)(*(jnp.asarray(a) for a in (q, k_bksh, v_bksh, mask))))
    np.testing.assert_allclose(got, np_attention(q, k, v, mask), atol=2e-5, rtol=1e-5)
    assert np.all(got[SEG == 0] == 0.0)  # padded query rows: zeros, not NaN


def test_padded_rows_have_finite_gradients():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 8, 2, 4)), jnp.float32) for _ in range(3))
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    mask = jnp.asarray(np_mask(SEG))
    loss = lambda q, k, v: jnp.sum(attend(q, k, v, mask) ** 2)  # noqa: E731
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


def _cfg(**kw):
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32)
    return ModelConfig(**{**base, **kw})


def test_attention_module_matches_numpy_with_gqa_rope_and_bias():
    cfg = _cfg(n_kv_heads=2, positions="rope", use_bias=False, qkv_bias=True, init_std=0.3)
    with nnx.use_eager_sharding(False):
        attn = Attention(cfg, rngs=nnx.Rngs(0))
    for i, name in enumerate(("q_bias", "k_bias", "v_bias")):  # random, so they matter
        bias = getattr(attn, name)
        bias[...] = jax.random.normal(jax.random.key(i), bias[...].shape)
    names = ("q", "k", "v", "o", "q_bias", "k_bias", "v_bias")
    w = {name: np.asarray(getattr(attn, name)[...], np.float64) for name in names}
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 8, cfg.d_model)).astype(np.float32)
    pos = np.array([[0, 1, 2, 0, 1, 2, 3, 0], [0, 0, 0, 1, 2, 3, 4, 5]], np.int32)
    inv = rope_inv_freq(cfg.head_size, cfg.rope_theta, cfg.rope_scaling)
    run = jax.jit(lambda x, mask, pos: attn(x, mask, rope_angles(pos, inv))[0])
    got = run(jnp.asarray(x), jnp.asarray(np_mask(SEG)), jnp.asarray(pos))

    q = np.einsum("bld,dhk->blhk", x, w["q"]) + w["q_bias"]
    k = np.einsum("bld,dhk->blhk", x, w["k"]) + w["k_bias"]
    v = np.einsum("bld,dhk->blhk", x, w["v"]) + w["v_bias"]
    q, k = np_rotate_half_rope(q, pos, inv), np_rotate_half_rope(k, pos, inv)
    ref = np.einsum("blhk,hkd->bld", np_attention(q, k, v, np_mask(SEG)), w["o"])
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4, rtol=1e-4)


def test_rope_matches_hf_rotate_half():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 5, 3, 16)).astype(np.float32)
    pos = rng.integers(0, 5000, size=(2, 5)).astype(np.int32)
    inv = rope_inv_freq(16, 10000.0, RopeScalingConfig())
    got = apply_rope(jnp.asarray(x), rope_angles(jnp.asarray(pos), inv))
    np.testing.assert_allclose(np.asarray(got), np_rotate_half_rope(x, pos, inv), atol=2e-4)


def test_rope_inv_freq_default_linear_and_llama3():
    dim, theta = 64, 500000.0
    plain = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
    np.testing.assert_allclose(rope_inv_freq(dim, theta, RopeScalingConfig()), plain, rtol=1e-6)
    linear = RopeScalingConfig(type="linear", factor=4.0)
    np.testing.assert_allclose(rope_inv_freq(dim, theta, linear), plain / 4.0, rtol=1e-6)
    llama3 = RopeScalingConfig(
        type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_seq_len=8192,
    )  # fmt: skip
    ref = np_llama3_inv_freq(dim, theta, 32.0, 1.0, 4.0, 8192)
    got = rope_inv_freq(dim, theta, llama3)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    # all three regimes occur at this size, so the test covers each branch
    wavelen = 2 * np.pi / plain
    assert (wavelen < 8192 / 4).any() and (wavelen > 8192).any()
    assert ((wavelen >= 8192 / 4) & (wavelen <= 8192)).any()


# ------------------------------------------ hand-written backward passes against autodiff


def _autodiff_attention(q_BLNH, k_BKSH, v_BKSH, mask_BLS):
    """Plain softmax attention that jax differentiates itself (no custom VJP)."""
    b, l_, n, h = q_BLNH.shape
    kv = k_BKSH.shape[1]
    q = q_BLNH.reshape(b, l_, kv, n // kv, h)
    s = jnp.einsum("blkgh,bksh->bkgls", q, k_BKSH) / math.sqrt(h)
    s = jnp.where(mask_BLS[:, None, None], s, -1e30)
    p = jax.nn.softmax(s, axis=-1) * jnp.any(mask_BLS, -1)[:, None, None, :, None]
    return jnp.einsum("bkgls,bksh->blkgh", p, v_BKSH).reshape(b, l_, n, h)


@pytest.mark.parametrize("length", [64, 256])  # 256: the blocked causal path on CPU
def test_attention_backward_matches_autodiff(length):
    rng = np.random.default_rng(2)
    b, n, kv, h = 2, 4, 2, 8
    seg = np.ones((b, length), np.int32)
    seg[0, length // 3 :] = 2
    seg[1, -length // 8 :] = 0
    mask = (
        jnp.asarray(np_mask(seg))
        if length <= 64
        else make_mask(jnp.arange(length), jnp.asarray(seg), jnp.arange(length), jnp.asarray(seg))
    )
    q = jnp.asarray(rng.normal(size=(b, length, n, h)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, kv, length, h)), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.normal(size=(b, length, n, h)), jnp.float32)

    def loss(fn, **kw):
        return lambda q, k, v: jnp.sum(jnp.tanh(fn(q, k, v, mask, **kw)) * w)

    got = jax.jit(jax.grad(loss(attend, causal=True), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(loss(_autodiff_attention), argnums=(0, 1, 2)))(q, k, v)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("w_is_out_in", [False, True])
@pytest.mark.parametrize("k_in,m_out", [(16, 48), (48, 16)])  # both transpose choices
def test_dense_backward_matches_autodiff(w_is_out_in, k_in, m_out):
    from jaxllm.models.layers import dense

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(3, 5, k_in)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(m_out, k_in) if w_is_out_in else (k_in, m_out)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(3, 5, m_out)), jnp.float32)
    plain = (lambda x, w: x @ w.T) if w_is_out_in else (lambda x, w: x @ w)

    def loss(f):
        return lambda x, w: jnp.sum(f(x, w) * g)

    got = jax.grad(loss(lambda x, w: dense(x, w, w_is_out_in=w_is_out_in)), argnums=(0, 1))(x, w)
    want = jax.grad(loss(plain), argnums=(0, 1))(x, w)
    for a, r in zip(got, want):
        np.testing.assert_allclose(a, r, atol=1e-5, rtol=1e-5)
