"""The device mesh (`data`, `fsdp`, `tensor`) from `MeshConfig`, validated before compiling."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh

from jaxllm.config import Config, MeshConfig
from jaxllm.errors import ConfigError

AXES = ("data", "fsdp", "tensor")


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Axis sizes with one -1 taking the remaining devices; errors name the mesh key."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sum(s == -1 for s in sizes) > 1:
        raise ConfigError("config key 'mesh': at most one axis may be -1")
    for name, s in zip(AXES, sizes):
        if s == 0 or s < -1:
            raise ConfigError(f"config key 'mesh.{name}': must be >= 1 or -1, got {s}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(
                f"config key 'mesh': {n_devices} devices are not divisible by {known}"
            )
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(
            f"config key 'mesh': data×fsdp×tensor = {math.prod(sizes)} but there are "
            f"{n_devices} devices"
        )
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """A mesh with Auto axis types (GSPMD propagation) over all (or the given) devices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices))
    return Mesh(np.array(devices).reshape(shape), AXES)


def validate_mesh(cfg: Config, n_devices: int, vocab_size: int) -> None:
    """Fails with one message, before any compilation, when the mesh cannot work."""
    data, fsdp, tensor = mesh_shape(cfg.mesh, n_devices)
    m = cfg.model
    batch = cfg.loader.batch_size
    if batch % (data * fsdp):
        raise ConfigError(
            f"config key 'loader.batch_size': {batch} is not divisible by data×fsdp = {data * fsdp}"
        )
    if batch % jax.process_count():
        raise ConfigError(f"config key 'loader.batch_size': {batch} not divisible by the processes")
    if tensor > 1 and cfg.mesh.rules != "fsdp_tp":
        raise ConfigError("config key 'mesh.rules': a tensor axis > 1 needs rules: fsdp_tp")
    checks = {"model.n_heads": m.n_heads, "model.n_kv_heads": m.kv_heads, "model.d_ff": m.d_ff}
    if cfg.mesh.rules == "fsdp_tp":
        checks["model.vocab_size"] = vocab_size
        for key, value in checks.items():
            if value % tensor:
                raise ConfigError(
                    f"config key '{key}': {value} is not divisible by the tensor axis ({tensor})"
                )
    if cfg.mesh.rules in ("fsdp", "fsdp_tp") and m.d_model % fsdp:
        raise ConfigError(
            f"config key 'model.d_model': {m.d_model} is not divisible by the fsdp axis ({fsdp})"
        )
