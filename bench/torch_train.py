"""The PyTorch baseline for `bench/mfu.py` on a GPU: nanoGPT's train step, torch.compile'd.

The same GPT-2 shape as a jaxllm preset (`bench/torch_gpt.py`: tied embedding, learned
positions, pre-LayerNorm, fused QKV, `scaled_dot_product_attention(is_causal=True)` — flash
attention on the GPU —, tanh-GELU), trained as nanoGPT and llm.c's PyTorch reference do:
bf16 autocast over f32 weights, fused AdamW, gradient clipping, `torch.compile`. Random
tokens of the given batch shape, one sequence per row; steady-state steps timed with the
GPU synchronised. MFU uses jaxllm's own FLOP count (`train_flops_per_token`), so the two
benches' figures compare one for one.

    python bench/torch_train.py --preset gpt2_124m --batch 64 --seq 1024 --json out.jsonl
    python bench/torch_train.py --preset tiny --batch 4 --seq 64 --steps 2 --no-compile  # CPU
    python bench/torch_train.py --config configs/tiny_pretrain.yaml --vocab 512 --no-compile

`--config` (with `--set`, as `bench/mfu.py` takes them) builds the model of a pretrain config,
its overrides included, at the config's batch shape: the same model as `bench/mfu.py` with the
same arguments. The JSON row holds the model's parameter count (`params`), which
`bench/suite_table.py` matches the jax rows on.

Bench only: jaxllm never imports torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from profile_summary import summary  # noqa: E402
from torch_gpt import GPT, make_optimizer  # noqa: E402

from jaxllm.config import from_dict, load_config, replace  # noqa: E402
from jaxllm.models.flops import train_flops_per_token  # noqa: E402
from jaxllm.training.peak import published_peak_of  # noqa: E402


def profile_steps(run_step, sync, cuda: bool, steps: int = 3) -> None:
    """Prints the device (CPU: host) time of `steps` steps per kernel, in the same groups and
    format as `bench/profile_summary.py` prints a jax trace's."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(steps):
            run_step()
        sync()
    times = {}
    for e in prof.events():
        if cuda and e.device_type.name != "CUDA":
            continue
        # a kernel's span; on CPU an op's own time (its children's excluded: ops nest)
        us = e.time_range.elapsed_us() if cuda else e.self_cpu_time_total
        ns, n = times.get(e.name, (0.0, 0))
        times[e.name] = (ns + us * 1e3, n + 1)
    print("profile torch:")
    print("\n".join(summary(times, steps)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="gpt2_124m", help="a jaxllm GPT-2-family preset")
    ap.add_argument("--config", default="", help="a pretrain config instead of --preset")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--vocab", type=int, default=50304,
                    help="vocabulary when the config takes the tokenizer's (model.vocab_size 0)")  # fmt: skip
    ap.add_argument("--batch", type=int, default=0, help="default: the config's, or 64")
    ap.add_argument("--seq", type=int, default=0, help="default: the config's, or 1024")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after 3 untimed)")
    ap.add_argument("--no-compile", action="store_true", help="eager (CPU smoke runs)")
    ap.add_argument("--profile", action="store_true",
                    help="profile 3 more steps (torch.profiler) and print the kernel time by "
                         "kind, grouped as bench/profile_summary.py groups jax's")  # fmt: skip
    ap.add_argument("--json", default="")
    ap.add_argument("--label", default="")
    args = ap.parse_args()

    if args.config:
        cfg = load_config(args.config, args.set)
        m = cfg.model if cfg.model.vocab_size else replace(cfg.model, vocab_size=args.vocab)
        args.batch, args.seq = args.batch or cfg.loader.batch_size, args.seq or cfg.loader.seq_len
    else:
        m = from_dict(
            {"model": {"preset": args.preset, "vocab_size": args.vocab}, "stage": "pretrain"}
        ).model
        args.batch, args.seq = args.batch or 64, args.seq or 1024
    source = f"--config {args.config}" if args.config else f"--preset {args.preset}"
    if m.mlp != "gelu" or m.positions != "learned" or not m.tie_embeddings:
        raise SystemExit(f"{source}: the torch baseline is GPT-2-shaped only")
    if args.seq > m.max_seq_len:
        raise SystemExit(f"--seq {args.seq}: longer than the model's max_seq_len {m.max_seq_len}")
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    model = GPT(m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff, m.max_seq_len).to(dev)
    opt = make_optimizer(model, 6e-4, 0.1, (0.9, 0.95), 1e-8, fused=cuda)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    fwd = model if args.no_compile else torch.compile(model)
    n_params = sum(p.numel() for p in model.parameters())  # jaxllm's param_count(m), the same

    def step(tokens, targets):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            logits = fwd(tokens)
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    def sync():
        if cuda:
            torch.cuda.synchronize()

    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, m.vocab_size, (args.batch, args.seq + 1), generator=g).to(dev)
    tokens, targets = t[:, :-1].contiguous(), t[:, 1:].contiguous()
    t0 = time.perf_counter()
    first = float(step(tokens, targets))
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        step(tokens, targets)
    sync()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step(tokens, targets)
        sync()
        times.append(time.perf_counter() - t0)
    med, best = statistics.median(times), min(times)
    tok = args.batch * args.seq
    flops = train_flops_per_token(m, args.seq) * tok
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = published_peak_of(name) or 0.0
    mfu = flops / med / peak if peak else 0.0
    print(f"torch {torch.__version__} on {name}; {m.preset} ({n_params / 1e6:.1f} M), "
          f"{args.batch} x {args.seq}, {'eager' if args.no_compile else 'torch.compile'}; "
          f"first step (compile) {compile_s:.1f} s, loss {first:.4f}")  # fmt: skip
    print(f"median step {med * 1e3:.1f} ms  {tok / med:,.0f} tokens/s  MFU {mfu:.1%}  "
          f"(best {best * 1e3:.1f} ms)")  # fmt: skip
    if args.json:
        mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
        row = dict(
            bench="torch", label=args.label, config=args.config, sets=args.set, preset=m.preset,
            params=n_params, params_m=round(n_params / 1e6, 1), compiled=not args.no_compile,
            batch=args.batch, seq_len=args.seq, compile_s=round(compile_s, 1),
            step_ms=round(med * 1e3, 2), best_step_ms=round(best * 1e3, 2),
            tokens_per_s=round(tok / med), mfu=round(mfu, 4), peak_mem_gib=round(mem, 2),
            first_loss=round(first, 4), device=name, torch=torch.__version__,
        )  # fmt: skip
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")
    if args.profile:  # after the row is written: a profiler failure loses no figure
        profile_steps(lambda: step(tokens, targets), sync, cuda)


if __name__ == "__main__":
    main()
