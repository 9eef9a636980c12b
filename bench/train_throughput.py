"""Training throughput on CPU: jaxllm's real train step against a PyTorch eager GPT.

Both sides train the same nanoGPT-shaped model (4 layers, width 256, 4 heads, d_ff 1024,
vocab 8000, tied embeddings, learned positions, pre-LayerNorm, tanh-GELU, biases), float32,
on the same batch (16 x 256 tokens), and each timed step is the FULL step: forward, backward,
global-norm clip (1.0) and the AdamW update (weight decay 0.1 on >= 2-D weights, b2 0.95).

- jaxllm is built the way `stage: pretrain` builds it: `make_mesh(MeshConfig(data=1))` (one
  device), `create_train_state`, `make_optimizer`, `lm_loss`, `make_train_step` (rules "dp").
- torch is `bench/torch_gpt.py`, eager, `torch.set_num_threads(2)` (one thread per core of the
  2-core machine this was tuned on; `--threads` changes it), foreach AdamW.
- FLOPs per token for both come from `jaxllm.models.flops.train_flops_per_token` (6N + 12·L·d
  per layer: the causal half of attention counted as done, for both).
- MFU divides by the machine's matmul peak measured in the same run: the best of N runs of
  large float32 matmuls (several shapes, the best one wins), once through jax and once
  through torch.

The two steps run interleaved (a jaxllm step, a torch step, repeated), so background load hits
both alike; medians and minima are both printed. Run from the repo root:

    .venv/bin/python bench/train_throughput.py            # ~3 minutes
    .venv/bin/python bench/train_throughput.py --quick    # ~1 minute
    .venv/bin/python bench/train_throughput.py --breakdown  # + forward / backward / update
    .venv/bin/python bench/train_throughput.py --ceiling    # + the matmul-only MFU bound

A third contender, `fused`, is jaxllm with `train.loss_chunk 32` (the output layer fused into
the loss, 32 positions of every row at a time; `--loss-chunk 0` leaves it out).

`--ceiling` answers "how far can MFU go before the matmuls themselves are the limit"
(`jaxllm.training.peak.matmul_bound`): it lists every `dot_general` of jaxllm's traced step
(scan bodies counted once per iteration), times each distinct one alone, jitted, on random
inputs, and divides the model's FLOPs by the sum — the MFU the step would reach if everything
else (softmax, GELU, norms, the loss, the optimizer) took no time at all.
"""

from __future__ import annotations

import argparse
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

from jaxllm.config import MeshConfig, ModelConfig, OptimConfig  # noqa: E402
from jaxllm.models.flops import param_count, train_flops_per_token  # noqa: E402
from jaxllm.sharding import make_mesh  # noqa: E402
from jaxllm.trainers.lm import lm_loss, model_fn  # noqa: E402
from jaxllm.training.optim import lr_schedule, make_optimizer  # noqa: E402
from jaxllm.training.peak import best_seconds, matmul_bound  # noqa: E402
from jaxllm.training.state import create_train_state, to_global  # noqa: E402
from jaxllm.training.step import make_train_step  # noqa: E402

BATCH, SEQ, VOCAB = 16, 256, 8000
MODEL = ModelConfig(
    vocab_size=VOCAB,
    d_model=256,
    n_layers=4,
    n_heads=4,
    d_ff=1024,
    max_seq_len=SEQ,
    norm="layernorm",
    mlp="gelu",
    positions="learned",
    use_bias=True,
    tie_embeddings=True,
    dtype="float32",
    param_dtype="float32",
)
OPTIM = OptimConfig(lr=3e-4, warmup_steps=100, weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0)
PER_ROUND = 3  # timed steps per contender per round, after one untimed (see `interleave`)
PEAK_SHAPES = ((4096, 4096, 4096), (2048, 2048, 2048), (4096, 256, 1024), (4096, 1024, 256))


def make_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """One row per document (no packing), as the torch model sees it."""
    rng = np.random.default_rng(seed)
    t = rng.integers(0, VOCAB, size=(BATCH, SEQ + 1)).astype(np.int32)
    return {
        "tokens": t[:, :-1],
        "targets": t[:, 1:],
        "segment_ids": np.ones((BATCH, SEQ), np.int32),
        "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ)).copy(),
        "loss_mask": np.ones((BATCH, SEQ), np.float32),
    }


# ------------------------------------------------------------------------------ jaxllm


class JaxStep:
    """jaxllm's train step exactly as `stage: pretrain` wires it; `__call__` runs one step."""

    def __init__(self, batch: dict[str, np.ndarray], total_steps: int = 1000, loss_chunk: int = 0):
        self.mesh = make_mesh(MeshConfig(data=1, rules="dp"), jax.devices()[:1])
        self.tx = make_optimizer(OPTIM, total_steps)
        self.graphdef, self.state, shardings = create_train_state(
            model_fn(MODEL, 0), self.tx, self.mesh, "dp", 0
        )
        self.step = make_train_step(
            self.graphdef, lm_loss(loss_chunk=loss_chunk), self.tx, lr_schedule(OPTIM, total_steps),
            shardings, self.mesh, "dp",
        )  # fmt: skip
        self.batch = to_global(batch, self.mesh)
        self.loss = float("nan")

    def __call__(self) -> None:
        self.state, metrics = self.step(self.state, self.batch)
        self.loss = float(metrics["loss"])  # a host sync: the step is complete

    def parts(self) -> dict[str, callable]:
        """Forward only, forward + backward and the optimizer update, jitted separately."""
        import optax
        from flax import nnx

        from jaxllm.sharding import use_rules

        loss_fn, frozen = lm_loss(), self.state.frozen
        params = jax.tree.map(jnp.copy, self.state.params)
        opt_state = jax.tree.map(jnp.copy, self.state.opt_state)

        def fwd(p, b):
            with use_rules(self.mesh, "dp"):
                return loss_fn(nnx.merge(self.graphdef, p, frozen), b, None)[0]

        fwd_j, grad_j = jax.jit(fwd), jax.jit(jax.grad(fwd))
        grads = grad_j(params, self.batch)

        def upd(p, o, g):
            u, o = self.tx.update(g, o, p)
            return optax.apply_updates(p, u), o

        upd_j = jax.jit(upd)
        return {
            "forward": lambda: fwd_j(params, self.batch).block_until_ready(),
            "forward+backward": lambda: jax.block_until_ready(grad_j(params, self.batch)),
            "optimizer update": lambda: jax.block_until_ready(upd_j(params, opt_state, grads)),
        }


# ------------------------------------------------------------------------------- torch


class TorchStep:
    def __init__(self, batch: dict[str, np.ndarray], threads: int):
        import torch
        import torch_gpt

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.torch = torch
        self.model = torch_gpt.GPT(VOCAB, MODEL.d_model, MODEL.n_layers, MODEL.n_heads,
                                   MODEL.d_ff, SEQ)  # fmt: skip
        self.opt = torch_gpt.make_optimizer(
            self.model, OPTIM.lr, OPTIM.weight_decay, (OPTIM.b1, OPTIM.b2), OPTIM.eps, fused=False
        )
        self.step = torch_gpt.make_train_step(self.model, self.opt, OPTIM.grad_clip)
        self.tokens = torch.from_numpy(batch["tokens"]).long()
        self.targets = torch.from_numpy(batch["targets"]).long()
        n = sum(p.numel() for p in self.model.parameters())
        want = param_count(MODEL)
        assert n == want, f"torch model has {n} parameters, jaxllm's {want}: shapes differ"
        self.loss = float("nan")

    def __call__(self) -> None:
        self.loss = float(self.step(self.tokens, self.targets))

    def parts(self) -> dict[str, callable]:
        import torch.nn.functional as F

        torch, model = self.torch, self.model

        def fwd():
            with torch.no_grad():
                logits = model(self.tokens)
                F.cross_entropy(logits.view(-1, VOCAB), self.targets.view(-1))

        def fwd_bwd():
            logits = model(self.tokens)
            loss = F.cross_entropy(logits.view(-1, VOCAB), self.targets.view(-1))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()

        def update():
            torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip)
            self.opt.step()

        fwd_bwd()
        return {"forward": fwd, "forward+backward": fwd_bwd, "optimizer update": update}


# ------------------------------------------------------------------------------- peaks


def matmul_peaks(repeats: int, threads: int) -> tuple[float, float]:
    """Best float32 matmul FLOP/s over `PEAK_SHAPES`, through jax and through torch."""
    import torch

    torch.set_num_threads(threads)
    mm = jax.jit(lambda a, b: a @ b)
    best_jax = best_torch = 0.0
    rng = np.random.default_rng(0)
    for m, k, n in PEAK_SHAPES:
        a = rng.standard_normal((m, k), np.float32)
        b = rng.standard_normal((k, n), np.float32)
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        flops = 2.0 * m * k * n
        t_jax = best_seconds(lambda a=ja, b=jb: mm(a, b), repeats)
        best_jax = max(best_jax, flops / t_jax)
        t_torch = best_seconds(lambda a=ta, b=tb: torch.mm(a, b), repeats)
        best_torch = max(best_torch, flops / t_torch)
    return best_jax, best_torch


def print_ceiling(jx: JaxStep, step_s: float, peak: float, repeats: int) -> None:
    model_flops = train_flops_per_token(MODEL, SEQ) * BATCH * SEQ
    lines = matmul_bound(jx.step, (jx.state, jx.batch), model_flops, peak, step_s, repeats)
    print("\n" + "\n".join(lines))


# ------------------------------------------------------------------------------- report


def interleave(
    fns: dict[str, callable], rounds: int, per_round: int, settle: int = 1
) -> dict[str, list[float]]:
    """`rounds` rounds; in each, every contender runs `settle` untimed steps and then
    `per_round` timed ones. The untimed steps keep one side's after-effects (threads still
    spinning, caches holding the other's data) out of the other's times: timed one step for
    one, both sides measured slower than in a process of their own, jax by up to 40 %."""
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:  # alternate who goes first
            for i in range(settle + per_round):
                t = time.perf_counter()
                fns[name]()
                if i >= settle:
                    times[name].append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (about a minute)")
    ap.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 10)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--breakdown", action="store_true", help="also time the step's parts")
    ap.add_argument("--ceiling", action="store_true",
                    help="also time the step's matmuls alone: the MFU bound they set")  # fmt: skip
    ap.add_argument("--loss-chunk", type=int, default=32,
                    help="also time jaxllm with train.loss_chunk N (0: do not)")  # fmt: skip
    args = ap.parse_args()
    rounds = args.rounds or (4 if args.quick else 10)
    peak_repeats = 5 if args.quick else 10

    tokens = BATCH * SEQ
    flops_tok = train_flops_per_token(MODEL, SEQ)
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}, {jax.devices()[0].device_kind})")
    import torch

    print(f"torch {torch.__version__}, torch.set_num_threads({args.threads})")
    print(
        f"model: {MODEL.n_layers} layers, d {MODEL.d_model}, {MODEL.n_heads} heads, "
        f"vocab {VOCAB}, {param_count(MODEL) / 1e6:.2f} M params; batch {BATCH} x {SEQ}; "
        f"{flops_tok / 1e6:.2f} MFLOP/token (train_flops_per_token)"
    )

    batch = make_batch()
    t = time.perf_counter()
    jx = JaxStep(batch)
    jx()
    print(f"jaxllm: state + compile + first step {time.perf_counter() - t:.1f} s")
    th = TorchStep(batch, args.threads)
    th()
    print(
        f"first-step loss: jaxllm {jx.loss:.4f}, torch {th.loss:.4f} (ln V = {np.log(VOCAB):.4f})"
    )
    steps = {"jaxllm": jx, "torch": th}
    if args.loss_chunk:
        steps["fused"] = JaxStep(batch, loss_chunk=args.loss_chunk)
        steps["fused"]()
        print(f"fused = jaxllm with train.loss_chunk {args.loss_chunk}: first-step loss "
              f"{steps['fused'].loss:.4f}")  # fmt: skip
    for _ in range(2):  # warm them all
        for fn in steps.values():
            fn()

    peak_jax, peak_torch = matmul_peaks(peak_repeats, args.threads)
    times = interleave(steps, rounds, PER_ROUND)
    peak_jax2, peak_torch2 = matmul_peaks(peak_repeats, args.threads)
    peak_jax, peak_torch = max(peak_jax, peak_jax2), max(peak_torch, peak_torch2)
    print(f"matmul peak (best of {peak_repeats} x {len(PEAK_SHAPES)} shapes, before and after): "
          f"jax {peak_jax / 1e9:.1f} GFLOP/s, torch {peak_torch / 1e9:.1f} GFLOP/s")  # fmt: skip

    print(f"\nfull train step, {rounds} interleaved rounds of 1 + {PER_ROUND} steps each")
    hdr = f"{'':8} {'median s':>9} {'min s':>7} {'tokens/s':>9} {'best tok/s':>10} "
    print(hdr + f"{'GFLOP/s':>8} {'MFU(jax pk)':>11} {'MFU(torch pk)':>13}")
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    for name in steps:
        fl = flops_tok * tokens / med[name]
        print(
            f"{name:8} {med[name]:9.3f} {best[name]:7.3f} {tokens / med[name]:9.0f} "
            f"{tokens / best[name]:10.0f} {fl / 1e9:8.1f} {fl / peak_jax:11.1%} "
            f"{fl / peak_torch:13.1%}"
        )
    print(
        f"\nratio jaxllm / torch tokens/s: {med['torch'] / med['jaxllm']:.2f}x (medians), "
        f"{best['torch'] / best['jaxllm']:.2f}x (best steps)"
    )
    if "fused" in steps:
        print(
            f"ratio fused / torch tokens/s: {med['torch'] / med['fused']:.2f}x (medians), "
            f"{best['torch'] / best['fused']:.2f}x (best steps); fused / jaxllm "
            f"{med['jaxllm'] / med['fused']:.2f}x (medians)"
        )
    bfl = {k: flops_tok * tokens / best[k] for k in best}
    print(
        f"MFU from best steps: jaxllm {bfl['jaxllm'] / peak_jax:.1%} of jax peak "
        f"({bfl['jaxllm'] / peak_torch:.1%} of torch peak); torch {bfl['torch'] / peak_torch:.1%}"
        f" of torch peak ({bfl['torch'] / peak_jax:.1%} of jax peak)"
        + (f"; fused {bfl['fused'] / peak_jax:.1%} of jax peak" if "fused" in bfl else "")
    )
    if args.ceiling:
        print_ceiling(jx, med["jaxllm"], peak_jax, peak_repeats)
        if "fused" in steps:
            print_ceiling(steps["fused"], med["fused"], peak_jax, peak_repeats)
    if args.breakdown:
        parts = {
            f"{n} {k}": f for n, o in (("jaxllm", jx), ("torch", th)) for k, f in o.parts().items()
        }
        pt = interleave(parts, max(rounds // 2, 3), PER_ROUND)
        print("\nbreakdown (median ms)")
        for k in ("forward", "forward+backward", "optimizer update"):
            j, t_ = statistics.median(pt[f"jaxllm {k}"]), statistics.median(pt[f"torch {k}"])
            print(f"  {k:18} jaxllm {j * 1e3:8.1f}   torch {t_ * 1e3:8.1f}   ratio {t_ / j:.2f}x")


if __name__ == "__main__":
    main()
