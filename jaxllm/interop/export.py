"""A Decoder's state → a HF model directory (`config.json` + `model.safetensors`) that
transformers' `from_pretrained` loads as `LlamaForCausalLM`, `Qwen2ForCausalLM` or
`GPT2LMHeadModel`.

Tensors are gathered and written one at a time (`write_safetensors` streams), so the host holds
one tensor, not the model. Tied embeddings are written once, as HF does. A scanned model's
stacked block weights (`model.scan_layers`) are sliced per layer as they are written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.interop.hf_config import InteropError, from_model_config, infer_family
from jaxllm.interop.hf_weights import Spec, assemble_hf, specs_for
from jaxllm.interop.safetensors_io import SINGLE, write_safetensors

_NP_DTYPES = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16, "float16": np.float16}


def _to_host(x: jax.Array) -> np.ndarray:
    """One parameter on this host (gathered across processes when it is sharded over them)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _param(flat: dict[tuple, Any], path: tuple) -> Any:
    """A thunk for our parameter at a Spec path (`blocks.<i>.…`), or None when absent; a
    scanned model's `blocks.…` holds every layer stacked, so layer i is a slice of it."""
    if path in flat:
        return flat[path].get_value
    stacked = flat.get(("blocks", *path[2:])) if path[:1] == ("blocks",) else None
    if stacked is None or not isinstance(path[1], int):
        return None
    return lambda: stacked.get_value()[path[1]]


def export_hf(
    state: nnx.State,
    m: ModelConfig,
    out_dir: Path,
    dtype: str = "float32",
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Writes `out_dir/config.json` and `out_dir/model.safetensors`; returns `out_dir`.

    `state` is the model's variables (e.g. from `load_checkpoint_model`); `extra_config` adds
    keys to config.json (bos/eos token ids). Every process gathers; process 0 writes.
    """
    family = infer_family(m)
    specs = specs_for(family, m)
    config = {**from_model_config(m, dtype), **(extra_config or {})}
    return write_hf(state, specs, config, out_dir, dtype, f"is it a {family} model?")


def write_hf(
    state: nnx.State, specs: list[Spec], config: dict[str, Any], out_dir: Path, dtype: str,
    hint: str = "",
) -> Path:  # fmt: skip
    """Writes `config` as config.json and the tensors of `specs`, read from `state`, as
    model.safetensors into `out_dir`; returns it. Every process gathers; process 0 writes."""
    if dtype not in _NP_DTYPES:
        raise InteropError(f"export dtype '{dtype}' unsupported (float32, bfloat16, float16)")
    flat = {tuple(path): var for path, var in nnx.to_flat_state(state)}
    missing = [s.ours for s in specs if _param(flat, s.ours) is None]
    if missing:
        name = ".".join(map(str, missing[0]))
        raise InteropError(
            f"model state has no parameter '{name}'" + (f" ({hint})" if hint else "")
        )
    tensors = assemble_hf(specs, lambda path: _to_host(_param(flat, path)()))
    out_dir = Path(out_dir)
    writer = jax.process_index() == 0
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    np_dtype = _NP_DTYPES[dtype]
    order = [(name, shape, np_dtype) for name, (shape, _) in tensors.items()]
    if writer:
        write_safetensors(out_dir / SINGLE, order, lambda name: tensors[name][1]())
    else:  # the other processes take part in each gather, in the same order
        for _, build in tensors.values():
            build()
    return out_dir
