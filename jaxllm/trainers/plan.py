"""`--plan`: what a training config will need per device, before anything is allocated.

`python -m jaxllm.main --config C --plan [--devices N] [--hardware h100] [--mfu 0.4]` builds the
model and the optimizer state abstractly (`jax.eval_shape`: no weights) on the configured mesh
— on N simulated CPU devices when the target hardware is not here — and reports per device:
parameter, optimizer-state and gradient bytes from the shardings; the compiled train step's
arguments, outputs and temporaries from XLA's memory analysis (ahead-of-time compile, unless
`--no-compile`); model FLOPs per step (`train_flops_per_token`), the compiled program's matmul
FLOPs (`hlo_matmul_flops`: every loop body times its trip count, so a scanned model's layers and
the grad-accum micro-batches all count, and so does remat's recompute), and the step time a
given MFU implies on the named hardware. It says plainly when the config does not fit that
hardware's memory and which knobs help. With `--no-compile` only the state (weights, gradients,
optimizer) is counted: it gives a verdict only when that alone does not fit.

XLA's own `cost_analysis()` FLOPs (`xla_flops_per_device` in the JSON) count each loop body
once — one layer of a scanned model, one micro-batch — so they undercount a scanned or
accumulating step many times over; the report shows them, so labelled, only where it cannot
read the matmuls (library calls on a GPU host).

Compiled on CPU for a GPU/TPU target, the temporaries are an estimate: CPU uses the XLA
attention path (an [B, N, L, L] probability tensor per layer) where the accelerator would run
a fused kernel, so for long sequences the figure is an upper bound. There, too, the causal
path runs in query blocks that skip the fully masked quarter of the scores (models/attention.py
`_causal_blocks`), so the compiled matmul count sits below the model count, which takes the
whole score matrix (gpt2_124m at seq 1024: 3.4 % below, exactly that quarter of attention).

The step is also traced for the target platform and lowered (no compiler of that platform is
needed): a TPU's program holds splash attention's Mosaic kernels, so what would fail to build
on the TPU (a block size the kernel refuses) shows here as `DOES NOT LOWER`.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import numpy as np

from jaxllm.config import Config, ModelConfig, replace
from jaxllm.errors import ConfigError
from jaxllm.models.flops import param_count, train_flops_per_token
from jaxllm.sharding import make_mesh, validate_mesh
from jaxllm.trainers.lm import lm_loss, model_fn, resolve_loss_chunk
from jaxllm.training.optim import lr_schedule, make_optimizer
from jaxllm.training.peak import HARDWARE
from jaxllm.training.state import batch_sharding, train_state_spec
from jaxllm.training.step import make_train_step

GiB = 2**30


def plan_model(cfg: Config) -> ModelConfig:
    """The model a config trains: its own `model:` with the vocabulary filled in (the preset's,
    or the tokenizer's when the config names one that exists)."""
    m = cfg.model
    if m.vocab_size:
        return m
    tok = cfg.inputs.tokenizer
    if tok:
        from pathlib import Path

        if Path(tok).exists():
            from jaxllm.tokenizer import Tokenizer

            return replace(m, vocab_size=Tokenizer.load(tok).vocab_size)
    preset_vocab = ModelConfig.PRESETS.get(m.preset, {}).get("vocab_size", 0)
    if not preset_vocab:
        raise ConfigError(
            "config key 'model.vocab_size': --plan needs the vocabulary: set it, or name an "
            "existing inputs.tokenizer"
        )
    return replace(m, vocab_size=preset_vocab)


def _bytes_per_device(abstract: Any, shardings: Any) -> int:
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True):
        total += math.prod(sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    return total


def _abstract_batch(cfg: Config, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    accum = cfg.train.grad_accum
    lead = (accum,) if accum > 1 else ()
    shape = (*lead, cfg.loader.batch_size, cfg.loader.seq_len)
    sharding = batch_sharding(mesh, len(shape), leading=len(lead))
    dtypes = {"tokens": np.int32, "targets": np.int32, "segment_ids": np.int32,
              "positions": np.int32, "loss_mask": np.float32}  # fmt: skip
    return {k: jax.ShapeDtypeStruct(shape, d, sharding=sharding) for k, d in dtypes.items()}


def _traced_step(cfg: Config, spec, tx, mesh, chunk: int):
    """The train step traced on abstract state and batch (nothing allocated)."""
    t = cfg.train
    step = make_train_step(
        spec.graphdef, lm_loss(t.z_loss, chunk), tx, lr_schedule(t.optim, t.steps),
        spec.shardings, mesh, cfg.mesh.rules, t.grad_accum,
    )  # fmt: skip
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        spec.abstract,
        spec.shardings,
    )
    return step.trace(state, _abstract_batch(cfg, mesh))


def _compile(cfg: Config, spec, tx, mesh, hardware: str) -> dict[str, float]:
    chunk = resolve_loss_chunk(cfg, backend_of(hardware))  # the target's choice, not this host's
    compiled = _traced_step(cfg, spec, tx, mesh, chunk).lower().compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {
        "loss_chunk": chunk,
        "argument_bytes": float(mem.argument_size_in_bytes),
        "output_bytes": float(mem.output_size_in_bytes),
        "alias_bytes": float(mem.alias_size_in_bytes),
        "temp_bytes": float(mem.temp_size_in_bytes),
        "xla_flops_per_device": float((cost or {}).get("flops", 0.0)),  # loop bodies once
        "matmul_flops_per_device": hlo_matmul_flops(compiled.as_text()),
    }


_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_ARRAY = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\w+\[([\d,]*)\]")
_DOT = re.compile(r"=\s*\w+\[([\d,]*)\]\S*\s+dot\(\s*(?:\w+\[[\d,]*\]\S*\s+)?%?([\w.\-]+)")
_CONTRACT = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")
_CALLEE = re.compile(
    r"\b(calls|to_apply|body|branch_computations|true_computation|false_computation)="
    r"(\{[^}]*\}|%?[\w.\-]+)"
)
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_BRANCHES = ("branch_computations", "true_computation", "false_computation")


def _dims(s: str) -> list[int]:
    return [int(d) for d in s.split(",") if d]


def hlo_matmul_flops(text: str) -> float | None:
    """FLOPs of the `dot`s of a compiled HLO module (`compiled.as_text()`, one device's
    program): 2 x output elements x contracted size each, a while loop's body times its
    `known_trip_count` (XLA's `cost_analysis` counts a body once), nested calls and fusions
    followed, a conditional's largest branch. None where the matmuls are library calls or
    convolutions this does not read (cuBLAS/cuDNN custom calls on a GPU host, TPU convolutions),
    or a loop's trip count is unknown."""
    if re.search(r"custom_call_target=\"__cu(blas|dnn)| convolution\(", text):
        return None
    comps: dict[str, tuple[float, list, dict]] = {}
    entry = cur = None
    for line in text.splitlines():
        if cur is None:
            m = _HEADER.match(line)
            if m and not line[0].isspace():
                cur = m.group(1)
                comps[cur] = (0.0, [], {})
                entry = cur if line.startswith("ENTRY") else entry
            continue
        if line.strip() == "}":
            cur = None
            continue
        flops, calls, shapes = comps[cur]
        if a := _ARRAY.match(line):
            shapes[a.group(1)] = _dims(a.group(2))
        if (d := _DOT.search(line)) and (k := _CONTRACT.search(line)):
            lhs = shapes[d.group(2)]
            flops += 2.0 * math.prod(_dims(d.group(1))) * math.prod(lhs[i] for i in _dims(k[1]))
        for kind, names in _CALLEE.findall(line):
            trip = _TRIP.search(line) if kind == "body" else None
            if kind == "body" and not trip:
                return None
            calls.append((kind, int(trip[1]) if trip else 1, re.findall(r"[\w.\-]+", names)))
        comps[cur] = (flops, calls, shapes)
    memo: dict[str, float] = {}

    def total(name: str) -> float:
        if name not in memo:
            f, calls, _ = comps[name]
            for kind, n, names in calls:
                sub = [total(c) for c in names]
                f += n * (max(sub) if kind in _BRANCHES else sum(sub))
            memo[name] = f
        return memo[name]

    return total(entry) if entry else None


_FUSED = {"tpu": ("tpu_custom_call", "Mosaic"), "gpu": ("__cudnn$fmha", "cuDNN attention")}


def lower_for_target(cfg: Config, m: ModelConfig, tx, mesh, hardware: str) -> dict[str, Any]:
    """The train step as the target platform's program, traced and lowered on this host
    (`lowering_for`: the target's attention kernel and layouts) without its compiler: whether
    it lowers, and how many distinct fused kernels it holds (a TPU's splash attention is
    three Mosaic kernels: forward, dq and dkv, one program each whatever the layer count).
    cuDNN attention traces only where cuDNN is (a GPU host): not checked elsewhere."""
    from jaxllm.models.kernels import resolve_attention
    from jaxllm.models.target import lowering_for

    platform = backend_of(hardware)
    out: dict[str, Any] = {"platform": platform}
    with lowering_for(platform):
        try:
            out["attention"] = kernel = resolve_attention(m)
        except ConfigError as e:  # an explicit kernel the target cannot run
            return {**out, "attention": m.attention, "lowered": False, "error": str(e)}
        if kernel == "cudnn" and jax.default_backend() != "gpu":
            return {**out, "lowered": None}
        try:
            spec = train_state_spec(model_fn(m, cfg.seed), tx, mesh, cfg.mesh.rules, cfg.seed)
            traced = _traced_step(cfg, spec, tx, mesh, resolve_loss_chunk(cfg))
            text = traced.lower(lowering_platforms=({"gpu": "cuda"}.get(platform, platform),))
            text = text.as_text()
        except Exception as e:  # any failure is the finding: reported, not raised
            return {**out, "lowered": False, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
    return {**out, "lowered": True, "fused_kernels": text.count("@" + _FUSED[platform][0])}


def backend_of(hardware: str) -> str:
    """The JAX backend a `HARDWARE` name runs: TPUs are named v4, v5e, ...; the rest are GPUs."""
    return "tpu" if hardware.startswith("v") else "gpu"


def _host_model(m: ModelConfig) -> ModelConfig:
    """The model as this host builds it for the memory estimate: an explicit attention kernel
    it cannot run (splash on a CPU) becomes auto (the XLA path); `lower_for_target` checks
    the target's kernel."""
    from jaxllm.models.kernels import resolve_attention

    try:
        resolve_attention(m)
        return m
    except ConfigError:
        return replace(m, attention="auto")


def make_plan(cfg: Config, hardware: str = "h100", mfu: float = 0.4, compile_step: bool = True):
    """The plan as a dict (`report` turns it into lines)."""
    if hardware not in HARDWARE:
        raise ConfigError(f"--hardware: unknown '{hardware}' (known: {', '.join(HARDWARE)})")
    if not 0 < mfu <= 1:  # also refuses NaN
        raise ConfigError(f"--mfu: expected a fraction in (0, 1], e.g. 0.4 for 40 %; got {mfu}")
    m = plan_model(cfg)
    n_dev = jax.device_count()
    validate_mesh(replace(cfg, model=m), n_dev, m.vocab_size)
    mesh = make_mesh(cfg.mesh)
    t = cfg.train
    tx = make_optimizer(t.optim, t.steps)
    spec = train_state_spec(model_fn(_host_model(m), cfg.seed), tx, mesh, cfg.mesh.rules, cfg.seed)
    tokens = cfg.loader.batch_size * cfg.loader.seq_len * t.grad_accum
    flops = train_flops_per_token(m, cfg.loader.seq_len) * tokens
    peak, memory = HARDWARE[hardware]
    out: dict[str, Any] = {
        "devices": n_dev,
        "mesh": dict(mesh.shape),
        "rules": cfg.mesh.rules,
        "params": param_count(m),
        "tokens_per_step": tokens,
        "param_bytes": _bytes_per_device(spec.abstract.params, spec.shardings.params),
        "optimizer_bytes": _bytes_per_device(spec.abstract.opt_state, spec.shardings.opt_state),
        "model_flops_per_step": flops,
        "hardware": hardware,
        "hardware_memory_bytes": memory,
        "mfu": mfu,
        "step_s_at_mfu": flops / (n_dev * peak * mfu),
    }
    out["gradient_bytes"] = out["param_bytes"]  # one gradient per trainable weight
    if compile_step:
        out.update(_compile(cfg, spec, tx, mesh, hardware))
        out["target_lowering"] = lower_for_target(cfg, m, tx, mesh, hardware)
        # donated state aliases the outputs: live = arguments + temporaries + new outputs
        out["peak_bytes"] = (
            out["argument_bytes"] + out["temp_bytes"] + out["output_bytes"] - out["alias_bytes"]
        )
        out["fits"] = out["peak_bytes"] <= memory
    else:
        # weights + gradients + optimizer, no activations: a lower bound on the peak, so it
        # can say "does not fit" (False) but never "fits" (None: not known)
        out["state_bytes"] = 2 * out["param_bytes"] + out["optimizer_bytes"]
        out["fits"] = False if out["state_bytes"] > memory else None
    return out


def advice(p: dict[str, Any], cfg: Config) -> list[str]:
    """Which knobs shrink what does not fit."""
    tips = []
    if p["param_bytes"] + p["optimizer_bytes"] > 0.5 * p["hardware_memory_bytes"]:
        tips.append(
            f"weights + optimizer take {(p['param_bytes'] + p['optimizer_bytes']) / GiB:.1f} GiB "
            f"per device: shard them wider (mesh.fsdp, now {p['mesh']['fsdp']}; rules fsdp / "
            "fsdp_tp) or add devices"
        )
    if p.get("temp_bytes", 0) > 0.3 * p["hardware_memory_bytes"]:
        remat = "full" if cfg.model.remat != "full" else None
        tips.append(
            f"activations take {p['temp_bytes'] / GiB:.1f} GiB: "
            + (f"model.remat: {remat} (now {cfg.model.remat}), " if remat else "")
            + "a smaller loader.batch_size with train.grad_accum to keep the tokens per step, "
            "or train.loss_chunk to fuse the output layer"
        )
    return tips


def _duration(seconds: float) -> str:
    return f"{seconds:,.2f} s" if seconds >= 1 else f"{seconds * 1e3:,.3g} ms"


def _lowering_line(low: dict[str, Any], hardware: str) -> str:
    where = f"{low['platform'].upper()} program ({hardware}), attention {low['attention']}"
    if low["lowered"] is None:
        return f"  {where}: not lowered here (cuDNN attention traces only on a GPU host)"
    if not low["lowered"]:
        return f"  {where}: DOES NOT LOWER: {low['error']}"
    kind = _FUSED[low["platform"]][1]
    return f"  {where}: lowers from this host ({low['fused_kernels']} distinct {kind} kernels)"


def report(p: dict[str, Any], cfg: Config) -> list[str]:
    def g(key):
        return f"{p[key] / GiB:8.2f} GiB"

    lines = [
        f"plan: {cfg.name} ({cfg.stage}), {p['params'] / 1e6:,.1f} M params, {p['devices']} "
        f"devices, mesh {p['mesh']}, rules {p['rules']}; {p['tokens_per_step']:,} tokens/step",
        f"  per device: parameters {g('param_bytes')}, optimizer {g('optimizer_bytes')}, "
        f"gradients {g('gradient_bytes')}",
    ]
    if "temp_bytes" in p:
        lines.append(
            f"  compiled step per device: arguments {g('argument_bytes')}, temporaries "
            f"{g('temp_bytes')}, outputs {g('output_bytes')}; peak about {g('peak_bytes')}"
        )
    flops = f"  FLOPs per step: model {p['model_flops_per_step'] / 1e12:,.2f} T"
    if p.get("matmul_flops_per_device"):
        flops += (
            f"; the compiled step's matmuls {p['matmul_flops_per_device'] * p['devices'] / 1e12:,.2f}"
            " T over all devices (every layer and micro-batch, remat's recompute included)"
        )
    elif p.get("xla_flops_per_device"):  # matmuls in library calls: XLA's figure, labelled
        flops += (
            f"; XLA's cost analysis {p['xla_flops_per_device'] * p['devices'] / 1e12:,.2f} T "
            "over all devices, counting a loop body once (one layer if scanned, one micro-batch)"
        )
    lines.append(flops)
    lines.append(
        f"  on {p['devices']} x {p['hardware']} at {p['mfu']:.0%} MFU: "
        f"{_duration(p['step_s_at_mfu'])} per step, "
        f"{p['tokens_per_step'] / p['step_s_at_mfu']:,.0f} tokens/s"
    )
    if "target_lowering" in p:
        lines.append(_lowering_line(p["target_lowering"], p["hardware"]))
    mem = p["hardware_memory_bytes"] / GiB
    if p["fits"] is None:  # --no-compile, state within memory: no verdict
        lines.append(
            f"  state only (activations not counted): {p['state_bytes'] / GiB:.1f} of {mem:.1f} "
            "GiB per device; plan without --no-compile for whether it fits"
        )
    elif p["fits"]:
        lines.append(f"  fits: about {p['peak_bytes'] / GiB:.1f} of {mem:.1f} GiB per device")
    else:
        need = (
            f"about {p['peak_bytes'] / GiB:.1f} GiB"
            if "peak_bytes" in p
            else f"the state alone (activations not counted) takes {p['state_bytes'] / GiB:.1f} GiB"
        )
        lines.append(f"  DOES NOT FIT: {need} per device, a {p['hardware']} has {mem:.1f} GiB")
        lines += [f"  - {tip}" for tip in advice(p, cfg)]
    return lines
