"""HF `config.json` ↔ `ModelConfig` for the families we support: llama, qwen2 and gpt2.

Reads both the transformers 4.x spellings (`rope_theta`, `rope_scaling`, `torch_dtype`) and the
5.x ones (`rope_parameters`, `dtype`). Anything the Decoder cannot reproduce exactly (exact GELU,
Llama's `attention_bias`, sliding windows, yarn RoPE, ...) is refused with one line naming the
key, never silently approximated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxllm.config import ModelConfig, RopeScalingConfig
from jaxllm.errors import JaxllmError

FAMILIES = ("llama", "qwen2", "gpt2")
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


class InteropError(JaxllmError):
    """A HF checkpoint or config that cannot be converted; the message names file and key."""


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    """The parsed `<hf_dir>/config.json`."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise InteropError(f"{path}: not found (expected a HF model directory with config.json)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InteropError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})") from None


def family_of(hf: dict[str, Any], where: str = "config.json") -> str:
    family = hf.get("model_type", "")
    if family not in FAMILIES:
        raise InteropError(
            f"{where}: unsupported model_type '{family}' (supported: {', '.join(FAMILIES)}, bert)"
        )
    return family


def to_model_config(hf: dict[str, Any], dtype: str = "float32", where: str = "config.json"):
    """`(family, ModelConfig)` for a parsed HF config; `dtype` is the param and compute dtype."""
    family = family_of(hf, where)
    base = _gpt2(hf, where) if family == "gpt2" else _llama_like(hf, family, where)
    m = ModelConfig(**base, dtype=dtype, param_dtype=dtype)
    try:
        m._validate()
    except ValueError as e:
        raise InteropError(f"{where}: unusable model shape ({e})") from None
    return family, m


def _need(hf: dict[str, Any], key: str, where: str) -> Any:
    if key not in hf:
        raise InteropError(f"{where}: missing key '{key}' (model_type {hf.get('model_type')})")
    return hf[key]


def _gpt2(hf: dict[str, Any], where: str) -> dict[str, Any]:
    act = hf.get("activation_function", "gelu_new")
    if act not in _GELU_TANH:
        raise InteropError(f"{where}: activation_function '{act}' unsupported (need gelu_new)")
    for key in (
        "scale_attn_by_inverse_layer_idx",
        "reorder_and_upcast_attn",
        "add_cross_attention",
    ):
        if hf.get(key):
            raise InteropError(f"{where}: {key}: true is not supported")
    if not hf.get("scale_attn_weights", True):
        raise InteropError(f"{where}: scale_attn_weights: false is not supported")
    d = _need(hf, "n_embd", where)
    return dict(
        vocab_size=_need(hf, "vocab_size", where),
        d_model=d,
        n_layers=_need(hf, "n_layer", where),
        n_heads=_need(hf, "n_head", where),
        d_ff=hf.get("n_inner") or 4 * d,
        max_seq_len=hf.get("n_positions", 1024),
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mlp="gelu",
        positions="learned",
        use_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def _llama_like(hf: dict[str, Any], family: str, where: str) -> dict[str, Any]:
    if hf.get("hidden_act", "silu") != "silu":
        raise InteropError(f"{where}: hidden_act '{hf['hidden_act']}' unsupported (need silu)")
    for key in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if hf.get(key):
            raise InteropError(f"{where}: {key}: true is not supported")
    theta, scaling = _rope(hf, where)
    n_heads = _need(hf, "num_attention_heads", where)
    return dict(
        vocab_size=_need(hf, "vocab_size", where),
        d_model=_need(hf, "hidden_size", where),
        n_layers=_need(hf, "num_hidden_layers", where),
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or 0,
        d_ff=_need(hf, "intermediate_size", where),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="swiglu",
        positions="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        use_bias=False,
        qkv_bias=family == "qwen2",
        tie_embeddings=hf.get("tie_word_embeddings", False),
    )


def _rope(hf: dict[str, Any], where: str) -> tuple[float, RopeScalingConfig]:
    """(theta, scaling) from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling`."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, RopeScalingConfig()
    if kind == "linear":
        return theta, RopeScalingConfig(type="linear", factor=float(_need(params, "factor", where)))
    if kind == "llama3":
        return theta, RopeScalingConfig(
            type="llama3",
            factor=float(_need(params, "factor", where)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_seq_len=int(params.get("original_max_position_embeddings", 8192)),
        )
    raise InteropError(
        f"{where}: rope type '{kind}' unsupported (supported: default, linear, llama3)"
    )


def infer_family(m: ModelConfig) -> str:
    """The HF family whose architecture equals this ModelConfig's (for export)."""
    gpt2_attn = m.kv_heads == m.n_heads and m.head_size * m.n_heads == m.d_model
    gpt2_rest = m.positions == "learned" and m.norm == "layernorm" and m.mlp == "gelu"
    if gpt2_attn and gpt2_rest and m.use_bias:
        return "gpt2"
    if m.positions == "rope" and m.norm == "rmsnorm" and m.mlp == "swiglu" and not m.use_bias:
        return "qwen2" if m.qkv_bias else "llama"
    raise InteropError(
        "model: no HF family matches this architecture (export supports GPT-2: learned "
        "positions + layernorm + gelu + biases; Llama/Qwen2: rope + rmsnorm + swiglu)"
    )


def from_model_config(m: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """The HF config.json dict for a ModelConfig (both 4.x and 5.x rope/dtype spellings)."""
    family = infer_family(m)
    common = {"model_type": family, "vocab_size": m.vocab_size, "torch_dtype": dtype}
    common["dtype"] = dtype
    if family == "gpt2":
        return {
            **common,
            "architectures": ["GPT2LMHeadModel"],
            "n_embd": m.d_model,
            "n_layer": m.n_layers,
            "n_head": m.n_heads,
            "n_inner": m.d_ff,
            "n_positions": m.max_seq_len,
            "layer_norm_epsilon": m.norm_eps,
            "activation_function": "gelu_new",
            "tie_word_embeddings": m.tie_embeddings,
        }
    rope = _rope_parameters(m)
    arch = "Qwen2ForCausalLM" if family == "qwen2" else "LlamaForCausalLM"
    return {
        **common,
        "architectures": [arch],
        "hidden_size": m.d_model,
        "intermediate_size": m.d_ff,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_size,
        "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": m.tie_embeddings,
        "rope_theta": m.rope_theta,
        "rope_parameters": rope,
        "rope_scaling": None if rope["rope_type"] == "default" else rope,
    }


def _rope_parameters(m: ModelConfig) -> dict[str, Any]:
    """transformers 5's `rope_parameters` (also written as 4.x's `rope_scaling`)."""
    s = m.rope_scaling
    if s.type == "none":
        return {"rope_theta": m.rope_theta, "rope_type": "default"}
    rope = {"rope_theta": m.rope_theta, "rope_type": s.type, "factor": s.factor}
    if s.type == "llama3":
        rope.update(
            low_freq_factor=s.low_freq_factor,
            high_freq_factor=s.high_freq_factor,
            original_max_position_embeddings=s.original_max_seq_len,
        )
    return rope
