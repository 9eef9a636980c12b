"""Prefix tuning (Li & Liang 2021): P trainable keys and values per layer (P =
`peft.num_virtual_tokens`) that sit before position 0 and every real token attends to.

The model holds one `Prefix` module (`model.prefix`); `prefix()` returns keys and values
[N layers, P, K kv heads, H]. Attention puts them in front of each row's keys (no RoPE: they
are free vectors) with segment `GLOBAL_SEGMENT`, so every document of a packed row sees
them, and padding is never seen; a KV cache starts with them in its first P slots.
Parameters: N·2·P·K·H (= N·2·P·d with as many kv heads as heads).

They start as "activations of real words" (the paper's better initialisation): each
layer's own key/value projections of P random vocabulary embeddings, normalised to unit
RMS as a block's attention input is. So prefix tuning does not start at the base model's
outputs: every query now also attends to P extra keys.

`peft.prefix_projection` reparameterises them as the paper does for stability: an
embedding [P, D] through `tanh(e W1 + b1) W2 + b2` (hidden `prefix_hidden`) gives all
layers' prefixes at once; that adds P·d + d·h + h + h·N·2·K·H + N·2·K·H parameters while
training. `fold` replaces the MLP by the prefixes it produces (a run's final checkpoint
holds only those).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import PeftConfig
from jaxllm.models.layers import ParamKeys


class PrefixParam(nnx.Param):
    """A prefix-tuning weight (the prefixes, or their reparameterisation MLP)."""


def _p(x: jax.Array, axes: tuple) -> PrefixParam:
    return PrefixParam(x.astype(jnp.float32), out_sharding=axes)


class Prefix(nnx.Module):
    """Every layer's prefix keys and values: `prefix() -> (k, v)`, each [N, P, K, H]."""

    def __init__(
        self, init_N2PKH: jax.Array, x_PD: jax.Array, hidden: int, rngs: nnx.Rngs | ParamKeys
    ):
        self.n_virtual = init_N2PKH.shape[2]
        self.shape = tuple(init_N2PKH.shape)
        if not hidden:
            self.kv = _p(init_N2PKH, (None, None, None, "kv_heads", "head_dim"))
            return
        d, out = x_PD.shape[1], math.prod(self.shape[:2] + self.shape[3:])
        scale = jnp.sqrt(jnp.mean(jnp.square(init_N2PKH)))  # match the plain init's scale
        self.kv = nnx.data(None)
        self.embedding = _p(x_PD, (None, "embed"))
        self.w1 = _p(jax.random.normal(rngs.params(), (d, hidden)) / math.sqrt(d), ("embed", None))
        self.b1 = _p(jnp.zeros((hidden,)), (None,))
        w2 = jax.random.normal(rngs.params(), (hidden, out)) * scale
        self.w2 = _p(w2 / math.sqrt(hidden), (None, None))
        self.b2 = _p(jnp.zeros((out,)), (None,))

    def __call__(self) -> tuple[jax.Array, jax.Array]:
        kv_N2PKH = self.kv[...] if self.kv is not None else self._project()
        return kv_N2PKH[:, 0], kv_N2PKH[:, 1]

    def _project(self) -> jax.Array:
        """The reparameterisation: row p of the embedding → all layers' prefixes at p."""
        h_PH = jnp.tanh(self.embedding[...] @ self.w1[...] + self.b1[...])
        out_PO = h_PH @ self.w2[...] + self.b2[...]
        n, two, p, k, h = self.shape
        return jnp.transpose(out_PO.reshape(p, n, two, k, h), (1, 2, 0, 3, 4))

    def fold(self) -> bool:
        """Replaces the reparameterisation by the prefixes it gives, in place."""
        if self.kv is not None:
            return False
        self.kv = _p(self._project(), (None, None, None, "kv_heads", "head_dim"))
        for name in ("embedding", "w1", "b1", "w2", "b2"):
            delattr(self, name)
        return True


def real_word_inputs(model: nnx.Module, p: int, rngs: nnx.Rngs | ParamKeys) -> jax.Array:
    """[P, D] float32: P random vocabulary embeddings scaled to unit RMS."""
    table_VD = model.embed.embedding[...].astype(jnp.float32)
    ids = jax.random.randint(rngs.params(), (p,), 0, table_VD.shape[0])
    x_PD = table_VD[ids]
    return x_PD * jax.lax.rsqrt(jnp.mean(jnp.square(x_PD), -1, keepdims=True) + 1e-6)


def layer_keys_values(model: nnx.Module, x_PD: jax.Array) -> jax.Array:
    """[N, 2, P, K, H]: each layer's key and value projections (with biases) of `x_PD`."""
    if model.cfg.scan_layers:
        attns = [(model.blocks.attn, i) for i in range(model.cfg.n_layers)]
    else:
        attns = [(b.attn, None) for b in model.blocks]

    def proj(attn: nnx.Module, i: int | None, name: str) -> jax.Array:
        w, bias = getattr(attn, name)[...], getattr(attn, f"{name}_bias")
        w = (w if i is None else w[i]).astype(jnp.float32)
        y_PKH = jnp.einsum("pd,dkh->pkh", x_PD, w)
        if bias is not None:
            y_PKH = y_PKH + (bias[...] if i is None else bias[...][i]).astype(jnp.float32)
        return y_PKH

    return jnp.stack([jnp.stack([proj(a, i, "k"), proj(a, i, "v")]) for a, i in attns])


def apply_prefix(
    backbones: list[tuple[str, nnx.Module]], cfg: PeftConfig, rngs: nnx.Rngs | ParamKeys
) -> list[str]:
    """Attaches a `Prefix` to every backbone (decoder or encoder), in place."""
    paths = []
    for path, model in backbones:
        if model.prefix is not None:
            raise ValueError(f"peft: {path}prefix exists already")
        x_PD = real_word_inputs(model, cfg.num_virtual_tokens, rngs)
        hidden = (cfg.prefix_hidden or model.cfg.d_model) if cfg.prefix_projection else 0
        model.prefix = Prefix(layer_keys_values(model, x_PD), x_PD, hidden, rngs)
        paths.append(f"{path}prefix")
    return paths


def prefix_count(n_layers: int, kv_width: int, d: int, cfg: PeftConfig) -> int:
    """N·2·P·(K·H), plus the reparameterisation MLP while it trains."""
    p, out = cfg.num_virtual_tokens, n_layers * 2 * kv_width
    if not cfg.prefix_projection:
        return p * out
    h = cfg.prefix_hidden or d
    return p * d + d * h + h + h * out + out
