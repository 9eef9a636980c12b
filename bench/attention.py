"""Attention kernels side by side (`jaxllm.models.kernels`): agreement and fwd+bwd time.

For each shape, on random bf16 inputs: the fused kernel of the platform (cudnn on a GPU,
splash on a TPU; on CPU `--smoke` compares splash in Pallas's interpret mode) against the xla path,
with rows of one document, packed rows (random document lengths) and no segment ids. Prints
the largest |difference| of the output and of dq, dk, dv on real (non-padding) tokens,
relative to the largest reference value, and the median time of a jitted forward+backward.
cuDNN's packed layout runs with the default table of 16 documents per row (the packed rows
here hold about 5).

    python bench/attention.py [--json FILE] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxllm.models import kernels  # noqa: E402

SHAPES = {  # name: (B, L, N, K, H)
    "gpt2_124m": (16, 1024, 12, 12, 64),
    "llama_1b": (4, 2048, 32, 8, 64),
}
SMOKE = {"tiny": (2, 128, 4, 2, 16)}


def packed_segments(b: int, length: int, doc_len: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    starts = rng.random((b, length)) < 1.0 / doc_len
    starts[:, 0] = True
    seg = np.cumsum(starts, axis=1, dtype=np.int32)
    seg[:, length - length // 16 :] = 0  # a padded tail, as the packer leaves one
    return seg


def fwd_bwd(fn, seg):
    def loss(q, k, v):
        out = fn(q, k, v, seg).astype(jnp.float32)
        real = 1.0 if seg is None else (seg != 0)[..., None, None]
        return jnp.sum(out * real * 0.01), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def time_it(f, args, repeats: int) -> float:
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default="")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU)")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    backend = jax.default_backend()
    fused = {"gpu": "cudnn", "tpu": "splash"}.get(backend)
    if fused is None and args.smoke:
        fused = "splash"  # Pallas's interpret mode: the comparison itself runs on CPU
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; fused kernel: {fused}")
    rows = []
    for name, (b, length, n, k, h) in (SMOKE if args.smoke else SHAPES).items():
        keys = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(keys[0], (b, length, n, h), jnp.bfloat16)
        kk = jax.random.normal(keys[1], (b, length, k, h), jnp.bfloat16)
        v = jax.random.normal(keys[2], (b, length, k, h), jnp.bfloat16)
        packed = jnp.asarray(packed_segments(b, length, 256))
        cases = {"none": None, "one": jnp.ones((b, length), jnp.int32), "packed": packed}
        for docs, seg in cases.items():
            ref_f = fwd_bwd(kernels.ATTENTION["xla"], seg)
            (_, ref), ref_g = ref_f(q, kk, v)
            row = dict(bench="attention", shape=name, docs=docs, B=b, L=length, N=n, K=k, H=h)
            row["xla_ms"] = round(1e3 * time_it(ref_f, (q, kk, v), args.repeats), 3)
            if fused:
                f = fwd_bwd(kernels.ATTENTION[fused], seg)
                (_, out), g = f(q, kk, v)
                real = np.ones(ref.shape[:2], bool) if seg is None else np.asarray(seg) != 0
                pairs = [("out", out, ref), *zip(("dq", "dk", "dv"), g, ref_g, strict=True)]
                for what, a, r in pairs:
                    a, r = np.asarray(a, np.float32)[real], np.asarray(r, np.float32)[real]
                    row[f"rel_err_{what}"] = float(np.abs(a - r).max() / np.abs(r).max())
                row[f"{fused}_ms"] = round(1e3 * time_it(f, (q, kk, v), args.repeats), 3)

            print(json.dumps(row))
            rows.append(row)
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
