"""Host memory of `stage: import` on a ~1.1B-parameter Llama checkpoint.

The issue's target: importing a model must not need more host memory than ~1.5x its size.
This bench

1. generates a TinyLlama-1.1B-shaped HF checkpoint (hidden 2048, 22 layers, intermediate
   5632, 32 heads, 4 kv heads, vocab 32000, untied head: 1,100,048,384 parameters) with
   random weights: `config.json`, sharded `model-0000i-of-0000N.safetensors` and
   `model.safetensors.index.json`. Each tensor is generated, written and dropped before the
   next, by a small writer here (independent of jaxllm's), so the generator never holds the
   model either;
2. runs the real import in a child process, exactly as a user would:
   `python -m jaxllm.main --config configs/hf_import.yaml --set hf.path=... --set output_dir=...`
   and takes its peak RSS from the kernel (`wait4` ru_maxrss, which is VmHWM), while polling
   /proc/<pid>/status for the anonymous / file-backed split of RSS near the peak;
3. runs a baseline child that only imports jax + jaxllm's import stage and starts the CPU
   backend, so the model's share (peak - baseline) is reported on its own.

Peak RSS counts file pages mapped into the process (memory-mapped safetensors) as well as
anonymous memory, as the kernel and `top` do. Run from the repo root (needs ~5 GB free disk
for f32 plus the imported checkpoint, ~2-3 minutes on 2 cores):

    .venv/bin/python bench/import_memory.py                  # f32 checkpoint, import as f32
    .venv/bin/python bench/import_memory.py --dtype bfloat16 # bf16 checkpoint and import
    .venv/bin/python bench/import_memory.py --workdir /tmp/x --keep   # keep the files
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TARGET_RATIO = 1.5
LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
)
SHARD_BYTES = 2 * 1024**3  # HF's save_pretrained shards at a size limit; 2 GB gives 3 f32 shards
NP_DTYPES = {"float32": (np.float32, "F32"), "bfloat16": (ml_dtypes.bfloat16, "BF16")}


def tensor_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """HF Llama tensor names and shapes, in the order save_pretrained writes them."""
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    h = d // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * h
    out = [("model.embed_tokens.weight", (v, d))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (d, d)),
            (p + "self_attn.k_proj.weight", (kv, d)),
            (p + "self_attn.v_proj.weight", (kv, d)),
            (p + "self_attn.o_proj.weight", (d, d)),
            (p + "mlp.gate_proj.weight", (f, d)),
            (p + "mlp.up_proj.weight", (f, d)),
            (p + "mlp.down_proj.weight", (d, f)),
            (p + "input_layernorm.weight", (d,)),
            (p + "post_attention_layernorm.weight", (d,)),
        ]
    return out + [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]


def write_shard(path: Path, tensors: list, dtype, code: str, rng: np.random.Generator) -> None:
    """One safetensors file, streamed: header first, then each tensor generated and written."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": code,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in tensors:
            if name.endswith("norm.weight"):
                x = np.ones(shape, np.float32)
            else:
                x = rng.standard_normal(shape, dtype=np.float32)
                x *= 0.02
            fh.write(x.astype(dtype, copy=False).tobytes())
            del x


def generate(hf_dir: Path, dtype_name: str, seed: int = 0) -> tuple[int, int]:
    """Writes the checkpoint; returns (parameter count, bytes on disk)."""
    dtype, code = NP_DTYPES[dtype_name]
    itemsize = np.dtype(dtype).itemsize
    shapes = tensor_shapes(LLAMA_1B)
    shards: list[list] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = int(np.prod(shape)) * itemsize
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    hf_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    weight_map = {}
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(hf_dir / fname, tensors, dtype, code, rng)
        weight_map.update({name: fname for name, _ in tensors})
    n_params = sum(int(np.prod(s)) for _, s in shapes)
    index = {"metadata": {"total_size": n_params * itemsize}, "weight_map": weight_map}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "torch_dtype": dtype_name,
        **LLAMA_1B,
    }
    (hf_dir / "config.json").write_text(json.dumps(config, indent=2))
    disk = sum(f.stat().st_size for f in hf_dir.glob("*.safetensors"))
    return n_params, disk


def measure(cmd: list[str]) -> dict:
    """Runs `cmd`; its exit code, wall time, kernel peak RSS and the polled RSS split."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            try:
                text = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                return
            for line in text.splitlines():
                key, _, rest = line.partition(":")
                if key in seen:
                    seen[key] = max(seen[key], int(rest.split()[0]) * 1024)
            time.sleep(0.05)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    output = proc.stdout.read().decode(errors="replace")  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    watcher.join()
    return {
        "rc": proc.returncode,
        "wall_s": time.perf_counter() - start,
        "peak": usage.ru_maxrss * 1024,  # kB on Linux
        "anon": seen["RssAnon"],
        "file": seen["RssFile"],
        "output": output,
    }


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=sorted(NP_DTYPES), default="float32")
    ap.add_argument("--workdir", type=Path, help="where to write (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated and imported files")
    ap.add_argument("--hf", type=Path, help="reuse a checkpoint a --keep run generated")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="import_memory_", dir=args.workdir))
    hf_dir, out_dir = args.hf or work / "hf", work / "run"
    py = sys.executable
    try:
        t0 = time.perf_counter()
        if args.hf:
            n_params = sum(int(np.prod(s)) for _, s in tensor_shapes(LLAMA_1B))
            disk = sum(f.stat().st_size for f in hf_dir.glob("*.safetensors"))
        else:
            n_params, disk = generate(hf_dir, args.dtype)
        print(f"checkpoint: {n_params:,} params, {gb(disk)} ({time.perf_counter() - t0:.0f}s)")
        base = measure(
            [py, "-c", "import jax, jaxllm.main, jaxllm.trainers.hf_import; jax.numpy.zeros(1)"]
        )
        cmd = [py, "-m", "jaxllm.main", "--config", "configs/hf_import.yaml"]
        cmd += ["--set", f"hf.path={hf_dir}", "--set", f"hf.dtype={args.dtype}"]
        cmd += ["--set", f"output_dir={out_dir}"]
        print("$ " + " ".join(cmd))
        run = measure(cmd)
        print(run["output"][-2000:])
        ckpt = sum(f.stat().st_size for f in (out_dir / "checkpoints").rglob("*") if f.is_file())
        model = run["peak"] - base["peak"]
        rows = [
            ("parameters", f"{n_params:,}"),
            ("checkpoint dtype", args.dtype),
            ("checkpoint on disk", gb(disk)),
            ("import exit code", str(run["rc"])),
            ("import wall time", f"{run['wall_s']:.1f} s"),
            ("peak RSS (import)", gb(run["peak"])),
            ("  of which anon / file (polled)", f"{gb(run['anon'])} / {gb(run['file'])}"),
            ("baseline RSS (jax + jaxllm)", gb(base["peak"])),
            ("(peak - baseline) / ckpt", f"{model / disk:.2f}"),
            ("peak / ckpt", f"{run['peak'] / disk:.2f}"),
            ("jaxllm checkpoint written", gb(ckpt)),
        ]
        for k, v in rows:
            print(f"{k:34s} {v}")
        # The import's own memory is what sits above the runtime every jax process pays for
        # (the baseline); the whole process's peak is printed above as well.
        ok = run["rc"] == 0 and model / disk <= TARGET_RATIO
        print(f"target (peak - baseline) / ckpt <= {TARGET_RATIO}: {'PASS' if ok else 'FAIL'}")
        return 0 if ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
