"""Model FLOPs utilisation of `stage: pretrain`'s train step, for any pretrain config.

Builds the step exactly as `jaxllm/trainers/pretrain.py` does (mesh, `create_train_state`,
`make_optimizer`, `lm_loss`, `make_train_step`, grad accumulation) from a config file, feeds it
random tokens of the config's batch shape (no data or tokenizer needed), and times steady-state
steps. MFU = `train_flops_per_token` x tokens/s over the devices' peak: the published dense bf16
figure for accelerators (H100/H200: 989 TFLOP/s), the measured matmul peak on CPU
(`jaxllm.training.peak`). This is the issue's GPU benchmark:

    python bench/mfu.py --config configs/gpt2_124m.yaml
    python bench/mfu.py --config configs/gpt2_124m.yaml --set model.preset=gpt2_350m
    python bench/mfu.py --config configs/tiny_pretrain.yaml --vocab 8000 --steps 5   # CPU

`--set` overrides config keys as on the main CLI (e.g. `train.grad_accum=1`,
`loader.batch_size=32`, `model.remat=dots`, `train.loss_chunk=128`, `model.attention=xla`).
`--ceiling` (one device) adds the matmul-only bound: the step's dots timed one by one, and the
MFU they alone allow (`jaxllm.training.peak.matmul_bound`). `--docs` shapes the rows: `one`
document per row (segment ids all 1, the default), `packed` (documents of random lengths,
mean `--doc-len`, as the packed loader makes them: attention stays inside each document) or
`none` (no segment ids at all: attention across the whole row, as llm.c and nanoGPT train).
`--json FILE` appends the figures as one JSON line (bench/gpu_suite.sh collects them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxllm.config import load_config, replace  # noqa: E402
from jaxllm.models.flops import param_count, train_flops_per_token  # noqa: E402
from jaxllm.models.kernels import resolve_attention  # noqa: E402
from jaxllm.sharding import make_mesh  # noqa: E402
from jaxllm.trainers.lm import lm_loss, model_fn, resolve_loss_chunk  # noqa: E402
from jaxllm.training.optim import lr_schedule, make_optimizer  # noqa: E402
from jaxllm.training.peak import device_peak_flops, matmul_bound  # noqa: E402
from jaxllm.training.state import create_train_state, to_global, train_state_spec  # noqa: E402
from jaxllm.training.step import make_train_step  # noqa: E402


def random_batch(
    rows: int, length: int, vocab: int, accum: int, seed: int = 0, docs: str = "one",
    doc_len: int = 256,
) -> dict:  # fmt: skip
    """Packed-batch keys of random tokens; [accum, rows, L] under grad accumulation.
    `docs`: `one` document per row, `packed` documents of geometric lengths (mean
    `doc_len`) with positions restarting at each, `none`: no `segment_ids` key."""
    rng = np.random.default_rng(seed)
    lead = (accum,) if accum > 1 else ()
    t = rng.integers(0, vocab, size=(*lead, rows, length + 1)).astype(np.int32)
    shape = (*lead, rows, length)
    segments = np.ones(shape, np.int32)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), shape).copy()
    if docs == "packed":
        starts = rng.random(shape) < 1.0 / doc_len
        starts[..., 0] = True
        segments = np.cumsum(starts, axis=-1, dtype=np.int32)
        last_start = np.maximum.accumulate(np.where(starts, positions, 0), axis=-1)
        positions = positions - last_start
    batch = {
        "tokens": t[..., :-1],
        "targets": t[..., 1:],
        "segment_ids": segments,
        "positions": positions,
        "loss_mask": np.ones(shape, np.float32),
    }
    if docs == "none":
        del batch["segment_ids"]
    return batch


def quick_state(abstract):
    """A train state of `abstract`'s shapes without random initialisers: matrices
    0.02 * sin(a hashed index), vectors (norm scales, biases) ones, optimizer state and
    counters zeros. For timing steps only (losses mean nothing): on a GPU, compiling a
    124M model's random initialisers unrolled took over a minute."""

    def fill(x):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim < 2:
            return jnp.ones(x.shape, x.dtype) if x.ndim == 1 else jnp.zeros(x.shape, x.dtype)
        i = jax.lax.broadcasted_iota(jnp.float32, x.shape, x.ndim - 1)
        j = jax.lax.broadcasted_iota(jnp.float32, x.shape, x.ndim - 2)
        return (0.02 * jnp.sin(i * 12.9898 + j * 78.233)).astype(x.dtype)

    zeros = lambda x: jnp.zeros(x.shape, x.dtype)  # noqa: E731
    return abstract.replace(
        step=zeros(abstract.step),
        params=jax.tree.map(fill, abstract.params),
        frozen=jax.tree.map(fill, abstract.frozen),
        opt_state=jax.tree.map(zeros, abstract.opt_state),
        rng=zeros(abstract.rng),
    )


def profile_steps(step, state, batch, dest: str, steps: int = 3):
    """Runs `steps` more steps under `jax.profiler.trace`, copies the trace file to `dest`
    and prints its kernel-time summary; returns the state."""
    import shutil
    import tempfile

    from profile_summary import kernel_times, summary

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(steps):
                state, metrics = step(state, batch)
            float(metrics["loss"])
        found = sorted(Path(tmp).rglob("*.xplane.pb"))
        if not found:
            print("--profile: the tracer wrote no .xplane.pb")
            return state
        shutil.copyfile(found[0], dest)
    for device, times in kernel_times(dest).items():
        print(f"profile {device}:")
        print("\n".join(summary(times, steps)))
    return state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--config", required=True, help="a pretrain config (model, loader, train, mesh)"
    )
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (after 2 untimed)")
    ap.add_argument("--vocab", type=int, default=50304,
                    help="vocabulary when the config takes the tokenizer's (model.vocab_size 0)")  # fmt: skip
    ap.add_argument("--ceiling", action="store_true",
                    help="also time the step's matmuls alone: the MFU bound they set (1 device)")  # fmt: skip
    ap.add_argument("--docs", choices=("one", "packed", "none"), default="one",
                    help="documents per row: one, packed (random lengths), none (no masking)")  # fmt: skip
    ap.add_argument("--doc-len", type=int, default=256, help="mean document length (packed)")
    ap.add_argument("--quick-init", action="store_true",
                    help="fill the weights with a cheap deterministic pattern (timing only: "
                         "the state builds without compiling the random initialisers)")  # fmt: skip
    ap.add_argument("--profile", default="",
                    help="trace 3 more steps with jax.profiler, save the trace (.xplane.pb) "
                         "here and print where the device time goes (bench/profile_summary.py)")  # fmt: skip
    ap.add_argument("--hlo", default="", help="write the compiled step's optimised HLO here")
    ap.add_argument("--json", default="", help="append the figures to this JSONL file")
    ap.add_argument("--label", default="", help="a name for the JSON row")
    args = ap.parse_args()

    cfg = load_config(args.config, args.set)
    m = cfg.model if cfg.model.vocab_size else replace(cfg.model, vocab_size=args.vocab)
    t, length = cfg.train, cfg.loader.seq_len
    mesh = make_mesh(cfg.mesh)
    rows = cfg.loader.batch_size // jax.process_count()
    tokens_per_step = cfg.loader.batch_size * length * t.grad_accum
    flops_tok = train_flops_per_token(m, length)
    peak = device_peak_flops() * jax.device_count()
    dev = jax.devices()[0]
    print(f"jax {jax.__version__}: {jax.device_count()} x {dev.device_kind} ({dev.platform}); "
          f"mesh {dict(mesh.shape)}, rules {cfg.mesh.rules}")  # fmt: skip
    kernel, chunk = resolve_attention(m), resolve_loss_chunk(cfg)
    print(f"model: {param_count(m) / 1e6:.1f} M params, {m.n_layers} layers, d {m.d_model}, "
          f"vocab {m.vocab_size}, dtype {m.dtype}/{m.param_dtype}, remat {m.remat}, "
          f"attention {kernel}, loss_chunk {chunk}, docs {args.docs}; "
          f"{cfg.loader.batch_size} x {length} tokens x accum {t.grad_accum} = "
          f"{tokens_per_step:,} tokens/step; {flops_tok / 1e9:.3f} GFLOP/token")  # fmt: skip

    t_state = time.perf_counter()
    tx = make_optimizer(t.optim, t.steps)
    if args.quick_init:
        spec = train_state_spec(model_fn(m, cfg.seed), tx, mesh, cfg.mesh.rules, cfg.seed)
        graphdef, shardings = spec.graphdef, spec.shardings
        state = jax.jit(lambda: quick_state(spec.abstract), out_shardings=shardings)()
    else:
        graphdef, state, shardings = create_train_state(
            model_fn(m, cfg.seed), tx, mesh, cfg.mesh.rules, cfg.seed
        )
    step = make_train_step(
        graphdef, lm_loss(t.z_loss, chunk), tx, lr_schedule(t.optim, t.steps),
        shardings, mesh, cfg.mesh.rules, t.grad_accum,
    )  # fmt: skip
    host = random_batch(rows, length, m.vocab_size, t.grad_accum, jax.process_index(),
                        args.docs, args.doc_len)  # fmt: skip
    batch = to_global(
        host,
        mesh,
        leading=1 if t.grad_accum > 1 else 0,
    )
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    t1 = time.perf_counter()
    print(f"state {t0 - t_state:.1f} s, trace + lower {t1 - t0:.1f} s; compiling", flush=True)
    step = lowered.compile()
    t2 = time.perf_counter()
    print(f"compile {t2 - t1:.1f} s", flush=True)
    if args.hlo:
        Path(args.hlo).write_text(step.as_text())
    state, metrics = step(state, batch)
    first_loss = float(metrics["loss"])
    compile_s = time.perf_counter() - t0
    print(f"compile + first step {compile_s:.1f} s; loss {first_loss:.4f} "
          f"(ln V = {np.log(m.vocab_size):.4f})")  # fmt: skip
    state, metrics = step(state, batch)
    float(metrics["loss"])
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        float(metrics["loss"])  # the step is complete
        times.append(time.perf_counter() - t0)
    med, best = statistics.median(times), min(times)
    for name, s in (("median", med), ("best", best)):
        tps = tokens_per_step / s
        print(f"{name:6s} step {s * 1e3:8.1f} ms  {tps:12,.0f} tokens/s  "
              f"{flops_tok * tps / jax.device_count() / 1e12:7.2f} TFLOP/s per device  "
              f"MFU {flops_tok * tps / peak:6.1%}")  # fmt: skip
    print(f"peak: {peak / jax.device_count() / 1e12:.1f} TFLOP/s per device "
          f"({'published' if dev.platform != 'cpu' else 'measured matmul'})")  # fmt: skip
    mem = (dev.memory_stats() or {}).get("peak_bytes_in_use", 0)
    if mem:
        print(f"peak device memory: {mem / 2**30:.2f} GiB")
    if args.json:
        row = dict(
            bench="mfu", label=args.label, config=args.config, sets=args.set,
            preset=m.preset, params=param_count(m), params_m=round(param_count(m) / 1e6, 1),
            attention=kernel,
            loss_chunk=chunk, remat=m.remat, dtype=m.dtype, docs=args.docs,
            batch=cfg.loader.batch_size, seq_len=length, grad_accum=t.grad_accum,
            tokens_per_step=tokens_per_step, compile_s=round(compile_s, 1), xla_compile_s=round(t2 - t1, 1),
            step_ms=round(med * 1e3, 2), best_step_ms=round(best * 1e3, 2),
            tokens_per_s=round(tokens_per_step / med), mfu=round(flops_tok * tokens_per_step / med / peak, 4),
            best_mfu=round(flops_tok * tokens_per_step / best / peak, 4),
            peak_tflops_per_device=round(peak / jax.device_count() / 1e12, 1),
            peak_mem_gib=round(mem / 2**30, 2), first_loss=round(first_loss, 4),
            devices=f"{jax.device_count()} x {dev.device_kind}", jax=jax.__version__,
            xla_flags=os.environ.get("XLA_FLAGS", ""), quick_init=args.quick_init,
        )  # fmt: skip
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")
    if args.profile:  # after the row is written: a profiler failure loses no figure
        state = profile_steps(step, state, batch, args.profile)
    if args.ceiling and jax.device_count() > 1:
        print("--ceiling: skipped, it times the unsharded dots on one device (run on one device)")
    elif args.ceiling:
        step_flops = flops_tok * tokens_per_step
        print("\n".join(matmul_bound(step, (state, batch), step_flops, peak, med)))


if __name__ == "__main__":
    main()
