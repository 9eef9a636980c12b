"""Weight-only quantisation against float, measured in one run: bytes in memory and on disk,
validation perplexity, greedy decode tokens/s (KV-cache `Sampler`), and the QLoRA train
state against LoRA on a float base.

For a checkpoint (default: the tiny demo model) each of float / int8 / int4 is built by
`quantize_state` (what generate, score and eval do with `quantize:`); its params are saved
the same way (`{"params"}` through orbax, as `stage: quantize` writes them) to measure the
disk; perplexity is over the first `--rows` rows of `--seq` tokens of the validation split
(`stage: data`'s val shards, tokenised with the checkpoint's tokenizer, concatenated);
decoding is greedy, prompt 32 tokens, `--new` new tokens. `--hf-llama` also builds a
random-weight HF Llama (transformers, no download), imports it through `stage: import` and
measures it the same way. `--train-state` builds the sft start state of configs/tiny_lora.yaml
and configs/tiny_qlora.yaml and sums its bytes (trained adapters, Adam's moments, frozen base).

    .venv/bin/python bench/quant.py --checkpoint runs/tiny_pretrain/checkpoints \\
        --data runs/tiny_data --group 64 --hf-llama --train-state
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from jaxllm.config import MeshConfig, QuantizeConfig, load_config  # noqa: E402
from jaxllm.generation import Sampler  # noqa: E402
from jaxllm.interop import load_tokenizer  # noqa: E402
from jaxllm.models.quant import quant_bytes  # noqa: E402
from jaxllm.sharding import make_mesh  # noqa: E402
from jaxllm.trainers.lm import load_checkpoint_model, quantize_state  # noqa: E402
from jaxllm.trainers.score import score_ids  # noqa: E402
from jaxllm.training.checkpoint import Checkpointer  # noqa: E402


def val_rows(data_dir: Path, tok, seq: int, rows: int) -> list[list[int]]:
    ids: list[int] = []
    for shard in sorted((data_dir / "val").glob("*.jsonl")):
        for line in shard.read_text(encoding="utf-8").splitlines():
            ids += tok.encode(json.loads(line)["text"], add_bos=tok.bos_id >= 0)
            if len(ids) >= seq * rows:
                return [ids[i * seq : (i + 1) * seq] for i in range(rows)]
    return [ids[i * seq : (i + 1) * seq] for i in range(len(ids) // seq)]


def disk_bytes(graphdef, state) -> int:
    with tempfile.TemporaryDirectory() as d:
        ckpt = Checkpointer(Path(d), keep=1, async_save=False)
        ckpt.save(0, {"params": nnx.state(nnx.merge(graphdef, state), nnx.Param)}, {})
        ckpt.close()
        return sum(f.stat().st_size for f in (Path(d) / "0").rglob("*") if f.is_file())


def decode_tps(models: dict, vocab: int, batch: int, new: int, reps: int = 3) -> dict:
    """Greedy tokens/s of each (graphdef, state), timed round-robin (best of `reps`), so
    a noisy machine slows every method alike."""
    prompts = np.random.default_rng(batch).integers(3, vocab, (batch, 32)).tolist()
    key = jax.random.key(0)
    runs = {}
    for name, (g, s) in models.items():
        sampler = Sampler(g)

        def run(sampler=sampler, s=s):
            res = sampler(s, prompts, max_new_tokens=new, key=key, temperature=0.0)
            return np.asarray(res.tokens)

        run()  # compile
        runs[name] = run
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(reps):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: batch * new / t for name, t in best.items()}


def measure(ckpt: Path, rows: list[list[int]], group: int, new: int, batches) -> list[dict]:
    mesh = make_mesh(MeshConfig())
    graphdef, state, m, _ = load_checkpoint_model(ckpt, mesh)
    out, models = [], {}
    for method in ("none", "int8", "int4"):
        g, s = quantize_state(graphdef, state, QuantizeConfig(method, group), mesh)
        models[method] = (g, s)
        res = score_ids(g, s, rows, batch_size=8, max_len=len(rows[0]), mesh=mesh)
        total = sum(r["total_logprob"] for r in res)
        n = sum(r["num_tokens"] for r in res)
        out.append({"method": method, "memory_bytes": quant_bytes(s)["total"],
                    "disk_bytes": disk_bytes(g, s), "val_ppl": float(np.exp(-total / n)),
                    "val_tokens": n})  # fmt: skip
    for b in batches:
        tps = decode_tps(models, m.vocab_size, b, new)
        for row in out:
            row[f"decode_tps_b{b}"] = tps[row["method"]]
    for row in out:
        print(json.dumps(row), flush=True)
    return out


def report(name: str, rows: list[dict], batches) -> None:
    base = rows[0]
    print(f"\n{name}")
    print(f"{'method':>6} {'memory':>10} {'x':>5} {'disk':>10} {'x':>5} {'val ppl':>9} "
          + " ".join(f"{'tok/s b' + str(b):>10} {'x':>5}" for b in batches))  # fmt: skip
    for r in rows:
        dec = " ".join(
            f"{r[f'decode_tps_b{b}']:10.1f} {r[f'decode_tps_b{b}'] / base[f'decode_tps_b{b}']:5.2f}"
            for b in batches
        )
        print(f"{r['method']:>6} {r['memory_bytes']:10d} {r['memory_bytes'] / base['memory_bytes']:5.2f} "
              f"{r['disk_bytes']:10d} {r['disk_bytes'] / base['disk_bytes']:5.2f} "
              f"{r['val_ppl']:9.3f} {dec}")  # fmt: skip


def hf_llama(tmp: Path, tok_path: str) -> Path:
    """A random-weight HF Llama saved with safetensors, imported through stage import."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jaxllm.config import from_dict
    from jaxllm.trainers.hf_import import import_hf

    torch.manual_seed(0)
    hf_cfg = LlamaConfig(vocab_size=8000, hidden_size=256, intermediate_size=768,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False)  # fmt: skip
    LlamaForCausalLM(hf_cfg).save_pretrained(tmp / "hf", safe_serialization=True)
    shutil.copyfile(tok_path, tmp / "hf" / "tokenizer.model")
    cfg = from_dict({"stage": "import", "hf": {"path": str(tmp / "hf")}})
    (tmp / "imported").mkdir()
    import_hf(tmp / "hf", tmp / "imported", cfg)
    return tmp / "imported" / "checkpoints"


def train_state_bytes() -> None:
    from jaxllm.trainers.lm import init_from_checkpoint
    from jaxllm.training.optim import make_optimizer

    for name in ("tiny_lora", "tiny_qlora"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        tx = make_optimizer(cfg.train.optim, cfg.train.steps)
        start = init_from_checkpoint(cfg, tx, make_mesh(cfg.mesh))

        def size(tree) -> int:
            return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))

        st = start.state
        parts = {"trained": size(st.params), "optimizer": size(st.opt_state),
                 "frozen_base": size(st.frozen)}  # fmt: skip
        print(json.dumps({"config": name, **parts, "total": sum(parts.values())}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="runs/tiny_pretrain/checkpoints")
    ap.add_argument("--data", default="runs/tiny_data", help="a stage data dir (val/)")
    ap.add_argument("--group", type=int, default=64, help="int4 group size")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--new", type=int, default=64, help="decoded tokens per row")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--hf-llama", action="store_true")
    ap.add_argument("--train-state", action="store_true")
    ap.add_argument("--no-tiny", action="store_true", help="skip --checkpoint's figures")
    args = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x {len(jax.devices())}")
    _, _, _, meta = load_checkpoint_model(Path(args.checkpoint), make_mesh(MeshConfig()))
    tok = load_tokenizer(meta["tokenizer"])
    rows = val_rows(Path(args.data), tok, args.seq, args.rows)
    if not args.no_tiny:
        tiny = measure(Path(args.checkpoint), rows, args.group, args.new, args.batches)
        report(f"{args.checkpoint}: ratios vs float in this run", tiny, args.batches)
    if args.hf_llama:
        with tempfile.TemporaryDirectory() as d:
            ckpt = hf_llama(Path(d), meta["tokenizer"])
            llama = measure(ckpt, rows, args.group, args.new, args.batches)
        report("random-weight HF Llama (4 x 256, GQA 4/2, untied) via stage import", llama,
               args.batches)  # fmt: skip
    if args.train_state:
        train_state_bytes()


if __name__ == "__main__":
    main()
