"""PEFT methods against full fine-tuning on CPU: step time and peak host memory, same model
and batch.

Each mode runs in its own child process (so peak RSS is that mode's alone, read from the
kernel with `os.wait4`): the model (Llama-style, d_model 512, 8 layers, d_ff 1408, vocab 8000,
~29M parameters) is built as the stages build it (`create_train_state` with the stage's
trainable filter), then `make_train_step` runs warm-up steps and timed steps on a fixed
batch of 8 x 256 tokens. LoRA is rank 8 on every attention and MLP weight; `--methods`
adds bottleneck adapters (width 64), prefix tuning (20 virtual tokens through the
reparameterisation MLP of width 512) and prompt tuning (20 virtual tokens). The parent also
runs a child that builds nothing, whose peak is the process baseline (jax + jaxllm). Reported:
optimizer-state bytes, all arrays resident between steps (`jax.live_arrays`: weights, adapters,
optimizer state, batch), peak RSS (which also holds XLA's compile-time and activation peaks),
and step time.

    .venv/bin/python bench/lora_vs_full.py          # ~3 minutes on a 2-core CPU
    .venv/bin/python bench/lora_vs_full.py --methods full,lora,adapter,prefix,prompt
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BATCH, SEQ, VOCAB = 8, 256, 8000
MODES = ("full", "lora", "adapter", "prefix", "prompt")
PEFT = {  # mode → peft config keys
    "lora": {"method": "lora", "rank": 8, "alpha": 16.0},
    "adapter": {"method": "adapter", "adapter_dim": 64},
    "prefix": {"method": "prefix", "num_virtual_tokens": 20, "prefix_projection": True,
               "prefix_hidden": 512},
    "prompt": {"method": "prompt", "num_virtual_tokens": 20},
}  # fmt: skip


def child(mode: str, steps: int) -> None:
    sys.path.insert(0, str(ROOT))
    import jax
    import numpy as np
    from flax import nnx

    from jaxllm.config import MeshConfig, ModelConfig, OptimConfig, PeftConfig
    from jaxllm.models import Decoder
    from jaxllm.models.peft import apply_peft
    from jaxllm.sharding import make_mesh
    from jaxllm.trainers.lm import lm_loss, trainable_filter
    from jaxllm.training.optim import lr_schedule, make_optimizer
    from jaxllm.training.state import count_params, create_train_state, to_global
    from jaxllm.training.step import make_train_step

    if mode == "baseline":
        jax.numpy.zeros(1).block_until_ready()
        print(json.dumps({"mode": mode}))
        return
    m = ModelConfig(
        vocab_size=VOCAB, d_model=512, n_layers=8, n_heads=8, d_ff=1408, max_seq_len=SEQ,
        positions="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=True,
    )  # fmt: skip
    peft = PeftConfig(**PEFT.get(mode, {}))

    def build() -> Decoder:
        model = Decoder(m, rngs=nnx.Rngs(0))
        if peft.enabled:
            apply_peft(model, peft, nnx.Rngs(1))
        return model

    optim = OptimConfig(lr=1e-4, warmup_steps=0)
    tx = make_optimizer(optim, 1000)
    mesh = make_mesh(MeshConfig(data=1))
    graphdef, state, shardings = create_train_state(
        build, tx, mesh, "dp", 0, trainable=trainable_filter(peft)
    )
    step = make_train_step(graphdef, lm_loss(), tx, lr_schedule(optim, 1000), shardings, mesh, "dp")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, (BATCH, SEQ + 1), dtype=np.int32)
    host = {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": np.ones((BATCH, SEQ), np.int32),
        "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ)).copy(),
        "loss_mask": np.ones((BATCH, SEQ), np.float32),
    }
    batch = to_global(host, mesh)
    for _ in range(2):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    times.sort()
    print(
        json.dumps(
            {
                "mode": mode,
                "trainable": count_params(state.params),
                "total": count_params(state.params) + count_params(state.frozen),
                "opt_state_bytes": sum(x.nbytes for x in jax.tree.leaves(state.opt_state)),
                # everything resident between steps: weights, adapters, optimizer state, batch
                "live_bytes": sum(x.nbytes for x in jax.live_arrays()),
                "step_s_median": times[len(times) // 2],
                "step_s_min": times[0],
            }
        )
    )


def run(mode: str, steps: int) -> dict:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", mode, "--steps", str(steps)],
        stdout=subprocess.PIPE,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"{mode} child failed: {out}")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss": usage.ru_maxrss * 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", choices=["baseline", *MODES])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--methods", default="full,lora", help=f"comma-separated, from {MODES}")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.steps)
        return
    modes = args.methods.split(",")
    if modes[0] != "full" or not set(modes) <= set(MODES):
        raise SystemExit(f"--methods: 'full' first, then any of {MODES[1:]}")
    base = run("baseline", 0)["peak_rss"]
    results = [run(mode, args.steps) for mode in modes]
    full = results[0]
    mb = 1 / 2**20
    print(f"model: {full['total']:,} params, batch {BATCH} x {SEQ}, f32, {args.steps} timed steps")
    print(f"{'':8}{'trainable':>12}{'opt state MB':>14}{'live MB':>9}{'peak RSS MB':>13}"
          f"{'- baseline':>12}{'step s (median)':>17}{'min':>8}")  # fmt: skip
    for r in results:
        print(
            f"{r['mode']:8}{r['trainable']:>12,}{r['opt_state_bytes'] * mb:>14.1f}"
            f"{r['live_bytes'] * mb:>9.0f}{r['peak_rss'] * mb:>13.0f}{(r['peak_rss'] - base) * mb:>12.0f}"
            f"{r['step_s_median']:>17.3f}{r['step_s_min']:>8.3f}"
        )
    print(f"baseline process: {base * mb:.0f} MB")
    for r in results[1:]:
        print(
            f"{r['mode']} / full: step time {r['step_s_median'] / full['step_s_median']:.2f}x, "
            f"peak memory above baseline "
            f"{(r['peak_rss'] - base) / (full['peak_rss'] - base):.2f}x, "
            f"optimizer state {r['opt_state_bytes'] / full['opt_state_bytes']:.4f}x, "
            f"resident arrays {r['live_bytes'] / full['live_bytes']:.2f}x"
        )


if __name__ == "__main__":
    main()
