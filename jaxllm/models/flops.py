"""Closed-form parameter counts and training FLOPs per token, for MFU and scaling tables."""

from __future__ import annotations

from jaxllm.config import ModelConfig


def _block_params(cfg: ModelConfig) -> int:
    """Parameters of one transformer block (attention, MLP, two norms)."""
    d, f, dh = cfg.d_model, cfg.d_ff, cfg.head_size
    q_dim, kv_dim = cfg.n_heads * dh, cfg.kv_heads * dh
    attn = d * q_dim + 2 * d * kv_dim + q_dim * d
    if cfg.use_bias or cfg.qkv_bias:
        attn += q_dim + 2 * kv_dim
    if cfg.use_bias:
        attn += d
    n_up = 2 if cfg.mlp == "swiglu" else 1
    mlp = (n_up + 1) * d * f + (n_up * f + d if cfg.use_bias else 0)
    return attn + mlp + 2 * _norm_params(cfg)


def _norm_params(cfg: ModelConfig) -> int:
    return cfg.d_model * (2 if cfg.norm == "layernorm" and cfg.use_bias else 1)


def param_count(cfg: ModelConfig, *, exclude_embeddings: bool = False) -> int:
    """Number of parameters of `Decoder(cfg)`.

    `exclude_embeddings=True` leaves out the lookup tables (token embedding, learned
    positions) and the untied output head — the "non-embedding" N of Kaplan et al.
    """
    n = cfg.n_layers * _block_params(cfg) + _norm_params(cfg)
    if exclude_embeddings:
        return n
    n += cfg.vocab_size * cfg.d_model
    if cfg.positions == "learned":
        n += cfg.max_seq_len * cfg.d_model
    if not cfg.tie_embeddings:
        n += cfg.d_model * cfg.vocab_size
    return n


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training step (forward + backward) per token, as in PaLM (App. B).

    `6 * N + 12 * n_layers * d_attn * seq_len`, where
    - N = non-embedding parameters (every block weight, bias and norm, the final norm) plus
      `d_model * vocab_size` for the output projection matmul (counted once, tied or not).
      Embedding and position lookups are gathers, not matmuls, so they are not counted;
    - the attention term counts QK^T and PV (2 matmuls × 2 FLOPs × 3 for fwd+bwd) over the
      full seq_len × seq_len score matrix with d_attn = n_heads * head_dim, as the einsum
      computes it (causal masking does not halve it here). Rematerialisation is not counted:
      this is model FLOPs, not hardware FLOPs.
    """
    n = param_count(cfg, exclude_embeddings=True) + cfg.d_model * cfg.vocab_size
    d_attn = cfg.n_heads * cfg.head_size
    return 6.0 * n + 12.0 * cfg.n_layers * d_attn * seq_len
