"""Peak FLOP/s per device, for MFU: published figures for accelerators, measured on CPU;
and the matmul-only bound of a step (`matmul_bound`): what MFU it could reach if everything
but its matmuls were free — the benches' `--ceiling`."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense (not 2:4-sparse) bf16 peak FLOP/s per device, from the vendors' datasheets. A key is
# the words a `device_kind` (jax) or `torch.cuda.get_device_name()` must all contain (case
# aside; words split on spaces and "-"); the key with the most words wins, so "NVIDIA H100
# PCIe" is the PCIe card, never the SXM one, and "L4" never matches "L40S".
_PUBLISHED: dict[tuple[str, ...], float] = {
    # NVIDIA H100 datasheet: SXM 989.4 (1,979 sparse); PCIe 756 (1,513); NVL 835 (1,671)
    ("h100",): 989e12,  # "NVIDIA H100 80GB HBM3" (SXM)
    ("h100", "pcie"): 756e12,
    ("h100", "nvl"): 835e12,
    # NVIDIA H200 datasheet: SXM 989 (1,979 sparse); NVL 835 (1,671). GH200: the H100 SXM's
    ("h200",): 989e12,
    ("h200", "nvl"): 835e12,
    ("gh200",): 989e12,
    ("a100",): 312e12,  # A100 datasheet: 312 (624 sparse), SXM4 and PCIe alike
    ("l4",): 121e12,  # L4 datasheet: 121 (242 sparse)
    ("l40s",): 362e12,  # L40S datasheet: 362.05 (733 sparse)
    ("l40",): 181e12,  # L40 datasheet: 181.05 (362.1 sparse)
    # Google Cloud TPU docs, bf16 per chip (one jax device per chip from v4 on). jax names
    # v5e "TPU v5 lite", v5p "TPU v5", v6e "TPU v6 lite".
    ("tpu", "v4"): 275e12,
    ("tpu", "v5"): 459e12,  # v5p
    ("tpu", "v5p"): 459e12,
    ("tpu", "v5", "lite"): 197e12,  # v5e
    ("tpu", "v5e"): 197e12,
    ("tpu", "v6", "lite"): 918e12,  # v6e (Trillium)
    ("tpu", "v6e"): 918e12,
}


# name: (dense bf16 FLOP/s per chip, memory bytes per chip), for --plan's targets. Memory is
# in bytes, the whole card's as its driver reports it: a datasheet's "80 GB" / "141 GB" is
# neither exact GB nor GiB. NVIDIA: NVML's total (nvidia-smi's MiB), as tabulated in
# thundergolfer.com/blog/nvidia-gpu-memory-capacity (Modal, 2024: H100 81,559 MiB, H200
# 143,771, A100 80GB 81,920, L40S 46,068, L4 23,034) and nvidia-smi logs of an H100 PCIe
# (81,559 MiB) and an H100 NVL (95,830 MiB). TPUs: HBM per chip from the Cloud TPU system
# architecture pages (v4 32, v5e 16, v5p 95, v6e 32 "GB"), taken as GiB: HBM stacks come in
# binary sizes (not measured here on a TPU).
HARDWARE: dict[str, tuple[float, float]] = {
    "h100": (989e12, 81_559 * 2**20),  # 79.6 GiB
    "h100_pcie": (756e12, 81_559 * 2**20),  # 79.6 GiB
    "h100_nvl": (835e12, 95_830 * 2**20),  # 93.6 GiB
    "h200": (989e12, 143_771 * 2**20),  # 140.4 GiB
    "a100": (312e12, 81_920 * 2**20),  # 80.0 GiB (the 80 GB card)
    "l4": (121e12, 23_034 * 2**20),  # 22.5 GiB
    "l40s": (362e12, 46_068 * 2**20),  # 45.0 GiB
    "v4": (275e12, 32 * 2**30),
    "v5e": (197e12, 16 * 2**30),
    "v5p": (459e12, 95 * 2**30),
    "v6e": (918e12, 32 * 2**30),
}


def published_peak_of(kind: str) -> float | None:
    """The dense bf16 peak of a device named `kind` (jax's `device_kind`, or torch's device
    name), or None for a device the table lacks (a CPU)."""
    words = set(kind.lower().replace("-", " ").split())
    keys = [k for k in _PUBLISHED if words.issuperset(k)]
    return _PUBLISHED[max(keys, key=len)] if keys else None


def published_peak(device: jax.Device) -> float | None:
    return published_peak_of(getattr(device, "device_kind", ""))


@functools.cache
def measured_matmul_peak(n: int = 1024, dtype: str = "float32", repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of an n×n×n matmul on device 0 (the CPU's practical peak)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    return 2 * n**3 / best_seconds(lambda: f(a), repeats)


def best_seconds(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls of `fn()` (its result waited for), after one untimed."""
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best


def device_peak_flops() -> float:
    """Peak FLOP/s of one local device: published for accelerators, measured on CPU."""
    dev = jax.local_devices()[0]
    return published_peak(dev) or measured_matmul_peak()


# ----------------------------------------------------------------------------- matmul bound


def matmul_census(fn, *args) -> dict[tuple, int]:
    """{(lhs aval, rhs aval, dimension_numbers, preferred_element_type): count} of the
    `dot_general`s in the jaxpr of `fn(*args)`, nested jaxprs included (jit, custom VJPs,
    remat); a scan body's dots count `length` times. Shapes are global (unsharded)."""
    from jax.extend.core import ClosedJaxpr, Jaxpr

    counts: dict[tuple, int] = {}

    def walk(jaxpr, mult: int) -> None:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                lhs, rhs = (v.aval for v in eqn.invars)
                p = eqn.params
                key = (lhs, rhs, p["dimension_numbers"], p.get("preferred_element_type"))
                counts[key] = counts.get(key, 0) + mult
            inner = mult * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    if isinstance(sub, ClosedJaxpr):
                        walk(sub.jaxpr, inner)
                    elif isinstance(sub, Jaxpr):
                        walk(sub, inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr, 1)
    return counts


def time_dots_alone(counts: dict[tuple, int], repeats: int = 5) -> list[tuple]:
    """(best seconds of one, its FLOPs, count, key) per distinct dot of a `matmul_census`,
    each jitted alone on device 0 with random inputs."""
    rows = []
    keys = jax.random.split(jax.random.key(0), 2)
    for key, n in counts.items():
        lhs, rhs, dn, out_dtype = key
        a = jax.random.normal(keys[0], lhs.shape).astype(lhs.dtype)
        b = jax.random.normal(keys[1], rhs.shape).astype(rhs.dtype)
        dot = jax.jit(
            lambda a, b, dn=dn, t=out_dtype: jax.lax.dot_general(a, b, dn, preferred_element_type=t)
        )
        out = jax.eval_shape(dot, a, b)
        contracted = int(np.prod([lhs.shape[i] for i in dn[0][0]]))
        flops = 2.0 * int(np.prod(out.shape)) * contracted
        rows.append((best_seconds(lambda f=dot, a=a, b=b: f(a, b), repeats), flops, n, key))
    return rows


def matmul_bound(
    fn, args: tuple, model_flops: float, peak: float, step_s: float, repeats: int = 5
) -> list[str]:
    """Report lines for the dots of `fn(*args)` (one device's step), each timed alone:
    `bound_lines` of `time_dots_alone(matmul_census(fn, *args))`."""
    rows = time_dots_alone(matmul_census(fn, *args), repeats)
    return bound_lines(rows, model_flops, peak, step_s)


def bound_lines(rows: list[tuple], model_flops: float, peak: float, step_s: float) -> list[str]:
    """The dots' summed time alone, the MFU it allows (`model_flops` / (time * `peak`)), how
    much of a `step_s` step lies beyond it, and the six dots that take longest."""
    dot_s = sum(t * n for t, _, n, _ in rows)
    dot_flops = sum(f * n for _, f, n, _ in rows)
    beyond = max(step_s - dot_s, 0.0)
    lines = [
        f"matmul-only bound: the step's {sum(n for *_, n, _ in rows)} dots ({len(rows)} shapes, "
        f"{dot_flops / 1e9:.1f} GFLOP; the model counts {model_flops / 1e9:.1f}) take "
        f"{dot_s * 1e3:.1f} ms run one by one, {dot_flops / dot_s / 1e9:.0f} GFLOP/s = "
        f"{dot_flops / dot_s / peak:.0%} of the peak",
        f"  MFU ceiling with everything else free: {model_flops / dot_s / peak:.1%}; the step "
        f"({step_s * 1e3:.1f} ms) spends {beyond * 1e3:.1f} ms ({beyond / step_s:.0%}) beyond "
        "its dots",
        "  slowest (ms total = count x best ms alone, GFLOP/s, lhs x rhs):",
    ]
    for t, f, n, (lhs, rhs, dn, _) in sorted(rows, key=lambda r: -r[0] * r[2])[:6]:
        lines.append(
            f"    {t * n * 1e3:7.1f} = {n:2d} x {t * 1e3:6.2f}  {f / t / 1e9:6.0f}  "
            f"{lhs.str_short()} x {rhs.str_short()} contracting {dn[0]}"
        )
    return lines
