"""Reading and writing `.safetensors` files tensor by tensor, bf16 included.

The format is an 8-byte little-endian header size, a JSON header (name → dtype, shape, byte
range) and the raw data. Reading memory-maps the file and views each tensor's bytes with its
numpy dtype (`ml_dtypes.bfloat16` for BF16, which numpy lacks), so nothing is read until a
slice of it is used: a sharded load touches only the bytes of its own shards. Writing streams
one tensor at a time, so the host never holds the whole model either way.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from jaxllm.interop.hf_config import InteropError

DTYPES: dict[str, Any] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_CODES = {np.dtype(v): k for k, v in DTYPES.items()}
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(tensor entries, byte offset of the data section)."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InteropError(f"{path}: not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + size


class SafetensorsReader:
    """Lazy access to every tensor of a HF checkpoint directory (single file or sharded)."""

    def __init__(self, hf_dir: Path) -> None:
        hf_dir = Path(hf_dir)
        files = _shard_files(hf_dir)
        self._where: dict[str, tuple[Path, dict[str, Any], int]] = {}
        for path in files:
            header, start = _read_header(path)
            for name, entry in header.items():
                self._where[name] = (path, entry, start)

    @property
    def names(self) -> set[str]:
        return set(self._where)

    def info(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype code) of tensor `name`."""
        _, entry, _ = self._entry(name)
        return tuple(entry["shape"]), entry["dtype"]

    def get(self, name: str) -> np.ndarray:
        """A read-only view of tensor `name` (no bytes read until used).

        Each tensor gets its own mapping, unmapped when the view is dropped: the file pages a
        read touched count in the process's RSS while mapped, so a mapping of the whole shard
        kept for the whole load would add the checkpoint's size to the import's peak memory.
        """
        path, entry, start = self._entry(name)
        code = entry["dtype"]
        if code not in DTYPES:
            raise InteropError(f"{path}: tensor '{name}' has unsupported dtype {code}")
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end == begin:  # mmap cannot map zero bytes
            return np.zeros(shape, DTYPES[code])
        return np.memmap(path, DTYPES[code], mode="r", offset=start + begin, shape=shape)

    def _entry(self, name: str) -> tuple[Path, dict[str, Any], int]:
        if name not in self._where:
            raise InteropError(f"checkpoint has no tensor '{name}'")
        return self._where[name]


def _shard_files(hf_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the index's shards, or `model.safetensors`."""
    index = hf_dir / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InteropError(f"{index}: expected JSON with a 'weight_map' object") from None
        files = [hf_dir / f for f in sorted(set(weight_map.values()))]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise InteropError(f"{missing[0]}: shard listed in {index.name} not found")
        return files
    single = hf_dir / SINGLE
    if single.is_file():
        return [single]
    if list(hf_dir.glob("*.bin")):
        raise InteropError(
            f"{hf_dir}: only PyTorch .bin weights found; re-save with safe_serialization=True"
        )
    raise InteropError(f"{single}: not found (and no {INDEX})")


def write_safetensors(
    path: Path,
    specs: Iterable[tuple[str, tuple[int, ...], Any]],
    fetch: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes tensors `(name, shape, dtype)` in order, calling `fetch(name)` for each one's
    data just before writing it, so only one tensor is on the host at a time."""
    specs = list(specs)
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        code = _CODES[np.dtype(dtype)]
        header[name] = {
            "dtype": code,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data section 8-byte aligned, as the reference writer does
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in specs:
            arr = np.ascontiguousarray(fetch(name), dtype=dtype)
            if arr.shape != tuple(shape):
                raise InteropError(f"{path}: tensor '{name}' is {arr.shape}, expected {shape}")
            f.write(arr.tobytes())
    tmp.replace(path)


def load_hf_params(hf_dir: Path, family: str, m: Any, abstract: Any, shardings: Any) -> Any:
    """The Decoder's params (the tree of `abstract`, each leaf placed on its sharding from
    `shardings`, in `m.param_dtype`) from the HF checkpoint in `hf_dir`.

    Names and shapes are checked before any data is read. Each leaf is built with
    `jax.make_array_from_callback`: every device's shard is sliced from the memory-mapped
    tensor, so a host reads only the bytes its own devices hold.
    """
    from jaxllm.interop.hf_weights import check_names, detect_prefix, specs_for

    where = str(hf_dir)
    if getattr(m, "scan_layers", False):
        raise InteropError(
            f"{where}: HF import builds the unrolled layout (one tensor per layer); load it "
            "with model.scan_layers: false"
        )
    reader = SafetensorsReader(Path(hf_dir))
    specs = specs_for(family, m, detect_prefix(family, reader.names))
    check_names(specs, reader.names, m.tie_embeddings, where)
    return load_params(reader, specs, abstract, shardings, where)


def load_params(
    reader: SafetensorsReader,
    specs: list,
    abstract: Any,
    shardings: Any,
    where: str,
    fresh: dict[tuple, Any] | None = None,
) -> Any:
    """The tree of `abstract` with each leaf read from its Spec's tensor (in the leaf's dtype,
    placed on its sharding from `shardings`), or taken from `fresh` (path → array) for the
    parameters no tensor holds. Shapes and dtypes are checked before any data is read."""
    import jax  # local: reading and writing files works without jax

    from jaxllm.interop.hf_weights import check_tensor

    for spec in specs:
        check_tensor(spec, *reader.info(spec.hf), where=where)
    by_path = {tuple(s.ours): s for s in specs}
    fresh = fresh or {}

    def load(path: tuple, leaf: Any, sharding: Any) -> jax.Array:
        key = path_key(path)
        if key in fresh:
            return fresh[key]
        if key not in by_path:
            raise InteropError(f"{where}: no HF tensor maps to parameter '{_dotted(key)}'")
        arr = by_path[key].to_ours(reader.get(by_path[key].hf))
        if arr.shape != tuple(leaf.shape):
            raise InteropError(
                f"{where}: parameter '{_dotted(key)}' is {leaf.shape}, got {arr.shape}"
            )
        target = np.dtype(leaf.dtype)
        return jax.make_array_from_callback(
            arr.shape, sharding, lambda idx: np.asarray(arr[idx], dtype=target)
        )

    return jax.tree_util.tree_map_with_path(load, abstract, shardings)


def path_key(path: tuple) -> tuple:
    """A jax tree path as our parameter path (`('blocks', 0, 'attn', 'q')`)."""
    out = []
    for k in path:
        key = getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
        if key != "value":
            out.append(key)
    return tuple(out)


def _dotted(key: tuple) -> str:
    return ".".join(str(k) for k in key)
