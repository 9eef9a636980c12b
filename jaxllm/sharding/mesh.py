"""The device mesh (`data`, `fsdp`, `tensor`) from `MeshConfig`, validated before compiling.

The devices are laid out by `jax.experimental.mesh_utils` (topology-aware on TPU: the
`tensor` axis, the most talkative, on the nearest chips); when they span several TPU slices
the `data` axis goes across slices (DCN) and the rest within each slice (ICI).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from jaxllm.config import Config, MeshConfig, ModelConfig
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
                f"config key 'mesh': {_devices(n_devices)} are not divisible by {known}"
            )
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(
            f"config key 'mesh': data×fsdp×tensor = {math.prod(sizes)} but there are "
            f"{_devices(n_devices)}"
        )
    return tuple(sizes)  # type: ignore[return-value]


def _devices(n: int) -> str:
    """'8 devices', or '8 devices (2 processes × 4)' when they span processes."""
    procs = jax.process_count()
    if procs == 1 or n != jax.device_count():
        return f"{n} devices"
    return f"{n} devices ({procs} processes × {jax.local_device_count()})"


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """A mesh with Auto axis types (GSPMD propagation) over all (or the given) devices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices))
    return Mesh(device_grid(shape, devices), AXES)


def device_grid(shape: tuple[int, int, int], devices: list) -> np.ndarray:
    """The devices as an array of `shape` (data, fsdp, tensor), laid out by mesh_utils; a
    layout it cannot make for this device set (a few chips of a slice) falls back to the
    devices in order."""
    slices = sorted({getattr(d, "slice_index", 0) for d in devices})
    if len(slices) > 1:
        if shape[0] % len(slices):
            raise ConfigError(
                f"config key 'mesh.data': {shape[0]} must be a multiple of the "
                f"{len(slices)} TPU slices (the data axis spans slices)"
            )
        per_slice = (shape[0] // len(slices), *shape[1:])
        return mesh_utils.create_hybrid_device_mesh(
            per_slice, (len(slices), 1, 1), devices, allow_split_physical_axes=True
        )
    try:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.array(devices).reshape(shape)
    if not _process_blocks(grid):
        # each process must hold one block of the batch rows (it feeds, samples and reads
        # back its own rows): the topology's order interleaved the hosts, so order by process
        by_process = sorted(devices, key=lambda d: (d.process_index, d.id))
        grid = np.array(by_process).reshape(shape)
    return grid


def _process_blocks(grid: np.ndarray) -> bool:
    """Whether, along the batch shards (data × fsdp, in order), each process's devices
    form one run."""
    owners = [{d.process_index for d in shard} for shard in grid.reshape(-1, grid.shape[-1])]
    if any(len(o) > 1 for o in owners):  # a tensor group spans processes
        return len({p for o in owners for p in o}) == 1
    order = [next(iter(o)) for o in owners]
    runs = [p for i, p in enumerate(order) if i == 0 or p != order[i - 1]]
    return len(runs) == len(set(runs))


def validate_mesh(cfg: Config, n_devices: int, vocab_size: int) -> None:
    """Fails with one message, before any compilation, when the mesh cannot work."""
    data, fsdp, tensor = mesh_shape(cfg.mesh, n_devices)
    m = cfg.model
    batch = cfg.loader.batch_size
    if batch % (data * fsdp):
        raise ConfigError(
            f"config key 'loader.batch_size': {batch} is not divisible by data×fsdp = {data * fsdp}"
        )
    procs = jax.process_count()
    if batch % procs:
        raise ConfigError(
            f"config key 'loader.batch_size': {batch} is not divisible by the {procs} "
            "processes (each feeds an equal share of the rows)"
        )
    if (data * fsdp) % procs:
        raise ConfigError(
            f"config key 'mesh': data×fsdp = {data * fsdp} is not a multiple of the {procs} "
            "processes; each process feeds its own rows, so the batch axes must span them"
        )
    if tensor > 1 and cfg.mesh.rules != "fsdp_tp":
        raise ConfigError("config key 'mesh.rules': a tensor axis > 1 needs rules: fsdp_tp")
    check_model_mesh(dataclasses.replace(m, vocab_size=vocab_size), fsdp, tensor, cfg.mesh.rules)


def check_model_mesh(m: ModelConfig, fsdp: int, tensor: int, rules: str, where: str = "") -> None:
    """The model's sharded dimensions against the mesh's axes (a loaded checkpoint's model
    names itself in `where`): one message, before anything is placed."""
    checks = {"model.n_heads": m.n_heads, "model.n_kv_heads": m.kv_heads, "model.d_ff": m.d_ff}
    if rules == "fsdp_tp":
        checks["model.vocab_size"] = m.vocab_size
        for key, value in checks.items():
            if value % tensor:
                raise ConfigError(
                    f"config key '{key}'{where}: {value} is not divisible by the tensor axis "
                    f"({tensor})" + ("; set mesh.tensor to a divisor" if where else "")
                )
    if rules in ("fsdp", "fsdp_tp") and m.d_model % fsdp:
        raise ConfigError(
            f"config key 'model.d_model'{where}: {m.d_model} is not divisible by the fsdp axis "
            f"({fsdp})" + ("; set mesh.fsdp to a divisor" if where else "")
        )
