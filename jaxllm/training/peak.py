"""Peak FLOP/s per device, for MFU: published figures for accelerators, measured on CPU."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak per device (vendor figures).
_PUBLISHED = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


def published_peak(device: jax.Device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for name, flops in _PUBLISHED.items():
        if name.lower() in kind.lower():
            return flops
    return None


@functools.cache
def measured_matmul_peak(n: int = 1024, dtype: str = "float32", repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of an n×n×n matmul on device 0 (the CPU's practical peak)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def device_peak_flops() -> float:
    """Peak FLOP/s of one local device: published for accelerators, measured on CPU."""
    dev = jax.local_devices()[0]
    return published_peak(dev) or measured_matmul_peak()
