"""Name and layout mapping between HF checkpoints and the Decoder's parameters, both ways.

One `Spec` per Decoder parameter: which HF tensor (or which slice of it, for GPT-2's fused
`c_attn`) it comes from, and whether the HF matrix is transposed first. torch `Linear`
weights (Llama, Qwen2) are [out, in] → transposed; GPT-2's `Conv1D` weights are [in, out]
already. After that a reshape gives our head layout: q_proj [N*H, D] → q [D, N, H], o_proj
[D, N*H] → o [N, H, D]. Our `apply_rope` uses HF Llama's rotate-half pairing (dim i with
i + H/2), so q/k need no permutation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.interop.hf_config import InteropError

Path_ = tuple[str | int, ...]
# Present in some checkpoints, never needed: causal-mask buffers, cached RoPE frequencies.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


@dataclass(frozen=True)
class Spec:
    """Our parameter `ours` (shape `shape`) ← HF tensor `hf` (full shape `hf_shape`), taking
    `part = (axis, start, stop)` of it when fused, transposed first when `transpose`."""

    ours: Path_
    shape: tuple[int, ...]
    hf: str
    hf_shape: tuple[int, ...]
    transpose: bool = False
    part: tuple[int, int, int] | None = None

    def to_ours(self, x: np.ndarray) -> np.ndarray:
        """HF array → our layout; numpy views where possible (memory-mapped input stays lazy)."""
        if self.part is not None:
            axis, start, stop = self.part
            x = x[(slice(None),) * axis + (slice(start, stop),)]
        return (x.T if self.transpose else x).reshape(self.shape)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        """Our array → this spec's piece of the HF tensor (the inverse of `to_ours`)."""
        piece = list(self.hf_shape)
        if self.part is not None:
            axis, start, stop = self.part
            piece[axis] = stop - start
        if self.transpose:
            return x.reshape(piece[::-1]).T
        return x.reshape(piece)


def specs_for(family: str, m: ModelConfig, prefix: str | None = None) -> list[Spec]:
    """Every Decoder parameter's Spec; `prefix` is the HF name prefix of the base model
    (`model.` / `transformer.`, or "" for bare GPT-2 hub checkpoints)."""
    if family == "gpt2":
        return _gpt2_specs(m, "transformer." if prefix is None else prefix)
    return _llama_specs(m, "model." if prefix is None else prefix)


def _llama_specs(m: ModelConfig, p: str) -> list[Spec]:
    d, n, k, h, f, v = m.d_model, m.n_heads, m.kv_heads, m.head_size, m.d_ff, m.vocab_size
    out = [
        Spec(("embed", "embedding"), (v, d), f"{p}embed_tokens.weight", (v, d)),
        Spec(("final_norm", "scale"), (d,), f"{p}norm.weight", (d,)),
    ]
    if not m.tie_embeddings:
        out.append(Spec(("head",), (d, v), "lm_head.weight", (v, d), transpose=True))
    for i in range(m.n_layers):
        b, a = ("blocks", i), f"{p}layers.{i}."
        out += [
            Spec((*b, "attn_norm", "scale"), (d,), f"{a}input_layernorm.weight", (d,)),
            Spec((*b, "mlp_norm", "scale"), (d,), f"{a}post_attention_layernorm.weight", (d,)),
            Spec((*b, "attn", "q"), (d, n, h), f"{a}self_attn.q_proj.weight", (n * h, d), True),
            Spec((*b, "attn", "k"), (d, k, h), f"{a}self_attn.k_proj.weight", (k * h, d), True),
            Spec((*b, "attn", "v"), (d, k, h), f"{a}self_attn.v_proj.weight", (k * h, d), True),
            Spec((*b, "attn", "o"), (n, h, d), f"{a}self_attn.o_proj.weight", (d, n * h), True),
            Spec((*b, "mlp", "gate"), (d, f), f"{a}mlp.gate_proj.weight", (f, d), True),
            Spec((*b, "mlp", "up"), (d, f), f"{a}mlp.up_proj.weight", (f, d), True),
            Spec((*b, "mlp", "down"), (f, d), f"{a}mlp.down_proj.weight", (d, f), True),
        ]
        if m.qkv_bias:
            for name, heads in (("q", n), ("k", k), ("v", k)):
                hf = f"{a}self_attn.{name}_proj.bias"
                out.append(Spec((*b, "attn", f"{name}_bias"), (heads, h), hf, (heads * h,)))
    return out


def _gpt2_specs(m: ModelConfig, p: str) -> list[Spec]:
    d, n, h, f, v = m.d_model, m.n_heads, m.head_size, m.d_ff, m.vocab_size
    out = [
        Spec(("embed", "embedding"), (v, d), f"{p}wte.weight", (v, d)),
        Spec(("pos_embed",), (m.max_seq_len, d), f"{p}wpe.weight", (m.max_seq_len, d)),
        Spec(("final_norm", "scale"), (d,), f"{p}ln_f.weight", (d,)),
        Spec(("final_norm", "bias"), (d,), f"{p}ln_f.bias", (d,)),
    ]
    if not m.tie_embeddings:
        out.append(Spec(("head",), (d, v), "lm_head.weight", (v, d), transpose=True))
    for i in range(m.n_layers):
        b, a = ("blocks", i), f"{p}h.{i}."
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out.append(Spec((*b, ours, "scale"), (d,), f"{a}{theirs}.weight", (d,)))
            out.append(Spec((*b, ours, "bias"), (d,), f"{a}{theirs}.bias", (d,)))
        for j, name in enumerate("qkv"):
            w, bias = f"{a}attn.c_attn.weight", f"{a}attn.c_attn.bias"
            cut = (j * d, (j + 1) * d)
            out.append(Spec((*b, "attn", name), (d, n, h), w, (d, 3 * d), part=(1, *cut)))
            out.append(Spec((*b, "attn", f"{name}_bias"), (n, h), bias, (3 * d,), part=(0, *cut)))
        out += [
            Spec((*b, "attn", "o"), (n, h, d), f"{a}attn.c_proj.weight", (d, d)),
            Spec((*b, "attn", "o_bias"), (d,), f"{a}attn.c_proj.bias", (d,)),
            Spec((*b, "mlp", "up"), (d, f), f"{a}mlp.c_fc.weight", (d, f)),
            Spec((*b, "mlp", "up_bias"), (f,), f"{a}mlp.c_fc.bias", (f,)),
            Spec((*b, "mlp", "down"), (f, d), f"{a}mlp.c_proj.weight", (f, d)),
            Spec((*b, "mlp", "down_bias"), (d,), f"{a}mlp.c_proj.bias", (d,)),
        ]
    return out


def detect_prefix(family: str, names: set[str]) -> str:
    """The base-model prefix the checkpoint uses (e.g. GPT-2 hub files have none)."""
    embed = "wte.weight" if family == "gpt2" else "embed_tokens.weight"
    for prefix in ("transformer.", "model.", ""):
        if prefix + embed in names:
            return prefix
    raise InteropError(f"checkpoint has no token embedding tensor (looked for '*{embed}')")


def check_names(specs: list[Spec], names: set[str], tied: bool, where: str) -> None:
    """Every needed tensor present and nothing unexpected (a sign of another architecture)."""
    needed = {s.hf for s in specs}
    missing = sorted(needed - names)
    if missing:
        raise InteropError(f"{where}: missing tensor '{missing[0]}' ({len(missing)} missing)")
    extra = sorted(
        name
        for name in names - needed
        if not name.endswith(_IGNORED_SUFFIXES) and not (tied and name == "lm_head.weight")
    )
    if extra:
        raise InteropError(
            f"{where}: unexpected tensor '{extra[0]}' ({len(extra)} unexpected): the config "
            "does not describe these weights"
        )


def check_tensor(spec: Spec, shape: tuple[int, ...], code: str, where: str) -> None:
    if tuple(shape) != spec.hf_shape:
        raise InteropError(
            f"{where}: tensor '{spec.hf}' has shape {tuple(shape)}, expected {spec.hf_shape} "
            "from config.json"
        )
    if code not in ("F32", "F16", "BF16", "F64"):
        raise InteropError(f"{where}: tensor '{spec.hf}' has dtype {code}, expected a float type")


def assemble_hf(
    specs: list[Spec], get: Callable[[Path_], np.ndarray]
) -> dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]]:
    """HF tensor name → (shape, thunk building it from our params via `get(path)`); fused
    tensors concatenate their parts in order."""
    groups: dict[str, list[Spec]] = {}
    for s in specs:
        groups.setdefault(s.hf, []).append(s)

    def build(group: list[Spec]) -> Callable[[], np.ndarray]:
        def thunk() -> np.ndarray:
            pieces = [s.to_hf(np.asarray(get(s.ours))) for s in group]
            if group[0].part is None:
                return pieces[0]
            return np.concatenate(pieces, axis=group[0].part[0])

        return thunk

    return {name: (group[0].hf_shape, build(group)) for name, group in groups.items()}
