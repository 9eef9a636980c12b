"""Where a profiled step's device time goes: kernels grouped by kind, from a jax trace.

`bench/mfu.py --profile FILE` traces a few train steps with `jax.profiler` and saves the
trace (an XSpace `.xplane.pb`) as FILE; this reads it without TensorBoard
(`jax.profiler.ProfileData`) and prints, per device, the busy time per step split into
matmuls, attention, other kernels (fusions, copies, reductions), and the largest kernels:

    python bench/profile_summary.py bench_out/gpt2_124m.xplane.pb --steps 3

On a GPU the device plane's stream lines hold one event per kernel. On a CPU (the smoke
test) the host threads' XLA thunks stand in for kernels. `kind` sorts kernel names; torch's
profiler table (`bench/torch_train.py --profile`) uses the same groups, so the two frameworks'
steps compare group by group.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

KINDS = (
    ("attention", re.compile(r"cudnn|fmha|flash|sdpa|attention|splash", re.I)),
    (
        "matmul",
        re.compile(
            r"gemm|nvjet|xmma|cutlass|cublas|sm\d+_.*mma|dot|matmul|ynn_fusion|aten::(mm|addmm|bmm)\b",
            re.I,
        ),
    ),
    ("communication", re.compile(r"nccl|all-?reduce|all-?gather|reduce-?scatter", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy", re.I)),
)
DERIVED = re.compile(r"XLA Modules|XLA Ops|Steps|TraceMe|Framework|Source", re.I)


def kind(name: str) -> str:
    """The group of a kernel or op name: attention, matmul, communication, copy or other."""
    for label, pattern in KINDS:
        if pattern.search(name):
            return label
    return "other"


def kernel_times(path: str) -> dict[str, dict[str, tuple[float, int]]]:
    """{device: {kernel name: (total ns, count)}} from an `.xplane.pb` trace. GPU planes:
    every line whose name starts with "Stream" (kernels as the device ran them). Without a
    device plane (CPU): the host's XLA thunks, i.e. events that carry an `hlo_op` stat."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(path)
    has_device = any(p.name.startswith("/device:") for p in data.planes)
    out: dict[str, dict[str, list]] = {}
    for plane in data.planes:
        if plane.name.startswith("/device:"):
            lines = [ln for ln in plane.lines if ln.name.startswith("Stream")]
            if not lines:  # other tracers' names: all but the derived summary lines
                lines = [ln for ln in plane.lines if not DERIVED.search(ln.name)]
            print(f"{plane.name}: lines {[ln.name for ln in plane.lines]}, "
                  f"kernels from {[ln.name for ln in lines]}")  # fmt: skip
            events = [e for ln in lines for e in ln.events]
        elif plane.name == "/host:CPU" and not has_device:  # a GPU trace's host launches: no
            events = [e for ln in plane.lines for e in ln.events
                      if any(k == "hlo_op" for k, _ in e.stats)]  # fmt: skip
        else:
            continue
        if not events:
            continue
        table = out.setdefault(plane.name, defaultdict(lambda: [0.0, 0]))
        for e in events:
            table[e.name][0] += e.duration_ns
            table[e.name][1] += 1
    return {dev: {k: (v[0], v[1]) for k, v in t.items()} for dev, t in out.items()}


def summary(times: dict[str, tuple[float, int]], steps: int, top: int = 15) -> list[str]:
    """Lines: busy ms per step by kind (with shares), then the `top` kernels by time."""
    total = sum(ns for ns, _ in times.values()) or 1.0
    groups: dict[str, float] = defaultdict(float)
    for name, (ns, _) in times.items():
        groups[kind(name)] += ns
    lines = [f"busy {total / steps / 1e6:.2f} ms per step over {steps} steps"]
    for label, ns in sorted(groups.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {label:13s} {ns / steps / 1e6:8.2f} ms  {ns / total:6.1%}")
    lines.append(f"  top {top} kernels (ms per step, calls per step, kind):")
    for name, (ns, n) in sorted(times.items(), key=lambda kv: -kv[1][0])[:top]:
        short = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"  {ns / steps / 1e6:8.3f} {n / steps:6.1f}  {kind(name):11s} {short}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace", help="an .xplane.pb file (bench/mfu.py --profile)")
    ap.add_argument("--steps", type=int, default=1, help="steps the trace holds")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    for device, times in kernel_times(args.trace).items():
        print(device)
        print("\n".join(summary(times, args.steps, args.top)))


if __name__ == "__main__":
    main()
