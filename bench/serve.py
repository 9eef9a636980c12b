"""Serving load: N concurrent `openai` clients against `stage: serve`'s app on localhost vs
the same requests one at a time, in the same run: throughput (completion tokens/s) and
p50/p99 request latency, printed as ratios.

The model is `configs/tiny_pretrain.yaml`'s GPT shape (3.3 M parameters with the tiny
tokenizer's 8,000 pieces) with random weights, or a checkpoint (`--checkpoint DIR`). Every
request samples (temperature 1, its own seed) `--max-tokens` tokens: a random model almost
never draws `</s>`, so requests have the same length in both runs, and the seeds make the
two runs' texts identical (checked: a slot's draws do not depend on its neighbours).

    .venv/bin/python bench/serve.py --tokenizer runs/tiny_tokenizer/tokenizer.model
    .venv/bin/python bench/serve.py --concurrency 16 --requests 64 --max-tokens 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def backend(args):
    from flax import nnx

    from jaxllm.config import from_dict, load_config
    from jaxllm.generation.engine import Engine, Seq, run_until_done
    from jaxllm.interop import load_tokenizer
    from jaxllm.models import make_decoder
    from jaxllm.serving import Backend
    from jaxllm.trainers.serve import make_backend

    serve = {"model_name": "bench", "slots": args.slots, "max_queue": 4 * args.requests,
             "prefill_batch": args.prefill_batch}  # fmt: skip
    if args.checkpoint:
        cfg = from_dict({"stage": "serve", "inputs": {"checkpoint": args.checkpoint},
                         "serve": serve})  # fmt: skip
        return make_backend(cfg)[0]
    tok = load_tokenizer(args.tokenizer)
    model_cfg = load_config(ROOT / "configs/tiny_pretrain.yaml").model
    model_cfg = type(model_cfg)(**{**model_cfg.__dict__, "vocab_size": tok.vocab_size})
    graphdef, state = nnx.split(make_decoder(model_cfg, seed=0))
    engine = Engine(graphdef, state, slots=args.slots, max_len=model_cfg.max_seq_len,
                    prefill_batch=args.prefill_batch, max_queue=4 * args.requests).start()  # fmt: skip
    run_until_done(engine, [Seq(prompt=[2, 5], max_tokens=2)])
    return Backend(engine, tok, "bench", max_tokens=256)


def prompts(n: int) -> list[str]:
    words = [
        "In",
        "the",
        "beginning",
        "God",
        "created",
        "the",
        "heaven",
        "and",
        "the",
        "earth",
        "and",
        "the",
        "earth",
        "was",
    ]
    return [" ".join(words[: 3 + (7 * i) % len(words)]) + f" {i}" for i in range(n)]


def run(client, reqs, concurrency: int, max_tokens: int):
    """(wall seconds, per-request latencies, completion tokens, texts) of `reqs`."""

    def one(i_prompt):
        i, prompt = i_prompt
        t0 = time.perf_counter()
        out = client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens,
                                        temperature=1.0, seed=1000 + i)  # fmt: skip
        return time.perf_counter() - t0, out.usage.completion_tokens, out.choices[0].text

    t0 = time.perf_counter()
    if concurrency == 1:
        res = [one(x) for x in enumerate(reqs)]
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            res = list(pool.map(one, enumerate(reqs)))
    wall = time.perf_counter() - t0
    return wall, [r[0] for r in res], sum(r[1] for r in res), [r[2] for r in res]


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", default="runs/tiny_tokenizer/tokenizer.model")
    ap.add_argument("--checkpoint", default="", help="serve this checkpoint instead")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--prefill-batch", type=int, default=4)
    args = ap.parse_args()

    import openai

    from jaxllm.serving import Server

    server = Server(backend(args)).start()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    reqs = prompts(args.requests)
    run(client, reqs[: args.concurrency], args.concurrency, args.max_tokens)  # compile all
    seq = run(client, reqs, 1, args.max_tokens)
    con = run(client, reqs, args.concurrency, args.max_tokens)
    stats = dict(server.backend.engine.stats)
    server.stop()
    print(f"{args.requests} requests x {args.max_tokens} tokens, {args.slots} slots")
    for name, (wall, lat, toks, _) in (
        ("one at a time", seq),
        (f"{args.concurrency} concurrent", con),
    ):
        print(f"  {name:>14}: {toks / wall:8.1f} tokens/s  wall {wall:6.2f} s  "
              f"p50 {statistics.median(lat):.3f} s  p99 {pct(lat, 0.99):.3f} s")  # fmt: skip
    print(
        f"throughput ratio (concurrent / sequential): {(con[2] / con[0]) / (seq[2] / seq[0]):.2f}x"
    )
    print(f"p50 latency ratio: {statistics.median(con[1]) / statistics.median(seq[1]):.2f}x, "
          f"p99: {pct(con[1], 0.99) / pct(seq[1], 0.99):.2f}x")  # fmt: skip
    print(f"same texts in both runs: {seq[3] == con[3]}; busy slots per step over both runs "
          f"{stats['busy_slot_steps'] / max(stats['steps'], 1):.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
