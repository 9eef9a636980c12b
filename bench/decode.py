"""Decoding throughput: jaxllm's KV-cache `Sampler` against recomputing without a cache.

The model is the train bench's GPT shape (4 layers, width 256, 4 heads, vocab 8000, tied
embeddings, learned positions, float32) with `max_seq_len` 512 so that a 64-token prompt plus
256 new tokens fit. Greedy decoding (temperature 0) of 256 new tokens, batch 1 and batch 8.

- cached: `jaxllm.generation.Sampler` — one jitted prefill, then the whole decode loop in one
  compiled `lax.while_loop` over a donated KV cache.
- uncached: the textbook alternative, recompute the whole prefix for every new token. Made as
  fair as it gets: the prefix is right-padded to a multiple of 32 (causal, so padding behind
  the last token changes nothing; 9 compiled shapes, compiled before timing) and only the last
  position goes through the output layer, so each step costs one forward of ~the prefix.

Time to first token (TTFT) is the prompt's forward plus the first sampled token: for the
sampler, a `max_new_tokens=1` call (prefill + first token, through the public API); uncached,
one prefix forward. Both runs are greedy, so they should pick the same tokens; the agreement
is printed as a check (float rounding differs between the two paths, so an exact tie can
diverge a row late in a long generation).

    .venv/bin/python bench/decode.py            # ~2 minutes
    .venv/bin/python bench/decode.py --quick    # 64 new tokens, fewer repeats

On an accelerator (bench/gpu_suite.sh): `--preset gpt2_124m --dtype bfloat16 --batches 1 64
--no-uncached --json FILE` decodes with a preset's shape (vocab 50304), cached only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from jaxllm.config import ModelConfig  # noqa: E402
from jaxllm.generation import Sampler  # noqa: E402
from jaxllm.models import make_decoder  # noqa: E402

PROMPT, BUCKET = 64, 32
MODEL = ModelConfig(
    vocab_size=8000,
    d_model=256,
    n_layers=4,
    n_heads=4,
    d_ff=1024,
    max_seq_len=512,
    norm="layernorm",
    mlp="gelu",
    positions="learned",
    use_bias=True,
    tie_embeddings=True,
)


class Uncached:
    """Greedy decoding that recomputes the whole prefix for every token (no KV cache)."""

    def __init__(self, graphdef, state):
        self.state = state

        @jax.jit
        def next_token(state, tokens_BT, last):
            model = nnx.merge(graphdef, state)
            x_BTD = model.features(tokens_BT)
            x_B1D = jax.lax.dynamic_slice_in_dim(x_BTD, last, 1, axis=1)
            return jnp.argmax(model.logits(x_B1D)[:, 0], axis=-1).astype(jnp.int32)

        self.next_token = next_token

    def __call__(self, prompts: np.ndarray, new: int) -> np.ndarray:
        b, p = prompts.shape
        width = -(-(p + new) // BUCKET) * BUCKET
        buf = jnp.zeros((b, width), jnp.int32).at[:, :p].set(prompts)
        for t in range(new):
            n = p + t  # tokens so far; the next one goes to slot n
            padded = -(-n // BUCKET) * BUCKET
            tok = self.next_token(self.state, buf[:, :padded], jnp.int32(n - 1))
            buf = buf.at[:, n].set(tok)
        return np.asarray(buf[:, p : p + new])

    def warm(self, b: int, new: int) -> None:
        for padded in range(BUCKET, -(-(PROMPT + new) // BUCKET) * BUCKET + 1, BUCKET):
            if padded >= PROMPT:
                self.next_token(self.state, jnp.zeros((b, padded), jnp.int32), jnp.int32(0))


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 new tokens, fewer repeats")
    ap.add_argument("--new", type=int, default=0, help="new tokens (default 256)")
    ap.add_argument("--preset", default="", help="a model preset instead of the 4 x 256 GPT")
    ap.add_argument("--vocab", type=int, default=50304, help="vocabulary with --preset")
    ap.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on a GPU)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--no-uncached", action="store_true", help="time the KV-cache path only")
    ap.add_argument("--json", default="", help="append one JSON line per batch size")
    args = ap.parse_args()
    new = args.new or (64 if args.quick else 256)
    reps = 2 if args.quick else 3
    model = MODEL
    if args.preset:
        preset = {**ModelConfig.PRESETS[args.preset], "vocab_size": args.vocab}
        preset.pop("rope_scaling", None)  # a dict in the table; the default (none) is fine here
        model = dataclasses.replace(ModelConfig(), preset=args.preset, **preset)
    model = dataclasses.replace(model, dtype=args.dtype)

    graphdef, state = nnx.split(make_decoder(model, seed=0))
    sampler, uncached = Sampler(graphdef), Uncached(graphdef, state)
    key = jax.random.key(0)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; model "
          f"{args.preset or '4 x 256'} ({model.n_layers} x {model.d_model}, vocab "
          f"{model.vocab_size}, {model.dtype}); prompt {PROMPT} tokens, {new} new tokens, "
          "greedy")  # fmt: skip
    rows = []
    for b in args.batches:
        prompts = np.random.default_rng(b).integers(0, model.vocab_size, (b, PROMPT))
        plist = prompts.tolist()

        def cached(n=new, plist=plist):
            return sampler(state, plist, max_new_tokens=n, key=key, temperature=0.0)

        cached(), cached(1)  # compile
        t_cached, res = timed(cached, reps)
        ttft_cached, _ = timed(lambda: cached(1), reps + 2)
        t_unc = ttft_unc = same = float("nan")
        if not args.no_uncached:
            uncached.warm(b, new)
            t_unc, toks = timed(lambda p=prompts: uncached(p, new), max(reps - 1, 1))
            ttft_unc, _ = timed(lambda p=prompts: uncached(p, 1), reps + 2)
            same = float(np.mean(np.asarray(res.tokens) == toks))
        rows.append((b, t_cached, ttft_cached, t_unc, ttft_unc, same))
        if args.json:
            row = dict(
                bench="decode", preset=args.preset or "bench_gpt", dtype=model.dtype, batch=b,
                prompt=PROMPT, new_tokens=new, tokens_per_s=round(b * new / t_cached, 1),
                ms_per_token=round(1e3 * t_cached / new, 3), ttft_ms=round(1e3 * ttft_cached, 2),
                uncached_tokens_per_s=None if args.no_uncached else round(b * new / t_unc, 1),
                device=jax.devices()[0].device_kind,
                jax=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""),
            )  # fmt: skip
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")

    print(f"\n{'batch':>5} {'':9} {'total s':>8} {'tokens/s':>9} {'ms/token':>9} {'TTFT ms':>8}")
    for b, tc, fc, tu, fu, same in rows:
        for name, t, f in (("KV cache", tc, fc), ("no cache", tu, fu))[: 1 + (tu == tu)]:
            print(f"{b:5} {name:9} {t:8.3f} {b * new / t:9.1f} {1e3 * t / new:9.2f} {1e3 * f:8.1f}")
        if not args.no_uncached:
            print(f"{'':5} speed-up with the cache: {tu / tc:.1f}x tokens/s; "
                  f"TTFT ratio {fu / fc:.2f}x; same greedy tokens: {same:.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
