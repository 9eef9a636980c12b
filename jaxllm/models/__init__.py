"""Transformer models as Flax NNX modules, run functionally (split once, merge under jit)."""

from jaxllm.models.attention import Attention, KVCache, attend, make_mask
from jaxllm.models.decoder import Block, Decoder, make_decoder
from jaxllm.models.flops import param_count, train_flops_per_token

__all__ = [
    "Attention",
    "Block",
    "Decoder",
    "KVCache",
    "attend",
    "make_decoder",
    "make_mask",
    "param_count",
    "train_flops_per_token",
]
