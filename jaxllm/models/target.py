"""The platform a program is traced for: this host's, or another one's when lowering ahead of
time (`--plan` lowers a TPU config's train step on a CPU host).

Several choices are made while tracing, for the platform the program will run on: the
attention kernel (`kernels.resolve_attention`), the CPU-only layout tricks of the dense layers
and the XLA attention path, the CPU's chunked vocabulary reductions. They all ask
`target_platform()`, which is jax's default backend unless `lowering_for(platform)` says
otherwise for the code traced inside it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

_OVERRIDE: list[str] = []
_ALIASES = {"cuda": "gpu", "rocm": "gpu"}


def target_platform() -> str:
    """Where the program being traced will run: "cpu", "gpu" or "tpu"."""
    return (
        _OVERRIDE[-1] if _OVERRIDE else _ALIASES.get(jax.default_backend(), jax.default_backend())
    )


def on_cpu() -> bool:
    return target_platform() == "cpu"


@contextlib.contextmanager
def lowering_for(platform: str) -> Iterator[None]:
    """Trace for `platform` (cpu, gpu/cuda, tpu) inside the block: build the model and trace
    its step here, then lower with `lowering_platforms=` that platform."""
    name = _ALIASES.get(platform, platform)
    if name not in ("cpu", "gpu", "tpu"):
        raise ValueError(f"lowering_for: unknown platform {platform!r} (cpu, gpu, tpu)")
    _OVERRIDE.append(name)
    try:
        yield
    finally:
        _OVERRIDE.pop()
