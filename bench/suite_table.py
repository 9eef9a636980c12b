"""The Markdown table of a `bench/gpu_suite.sh` run, from its results.jsonl.

One line per training measurement (jax and torch), with each jax step's tokens/s as a ratio
to the torch step of the same model (preset and parameter count: a config's overrides of the
preset's shape count) and batch shape measured in the same run; then the decode and
attention-kernel rows. Rows without a parameter count (written before the benches stored one)
get no ratio.

    python bench/suite_table.py bench_out/results.jsonl > bench_out/table.md
"""

from __future__ import annotations

import json
import sys


def same_model(r: dict) -> tuple:
    """What a jax row and its torch baseline share: the model (preset, parameter count) and
    the batch shape."""
    return (r["preset"], r.get("params"), r["batch"], r["seq_len"])


def table(rows: list[dict]) -> str:
    torch = {same_model(r): r for r in rows if r["bench"] == "torch" and r.get("params")}
    out = [
        "| run | attention | loss_chunk | batch x seq | tokens/s | MFU | step ms | vs torch | memory GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["bench"] not in ("mfu", "torch"):
            continue
        shape = f"{r['batch']} x {r['seq_len']}"
        if r["bench"] == "torch":
            name = f"torch {'compile' if r['compiled'] else 'eager'} {r['preset']}"
            attn, chunk, ratio = "sdpa", "-", "1.00x"
        else:
            name, attn, chunk = r["label"] or r["preset"], r["attention"], r["loss_chunk"]
            if r.get("docs") != "one":
                attn += f" ({r['docs']} docs)"
            base = torch.get(same_model(r)) if r.get("params") else None
            ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        out.append(
            f"| {name} | {attn} | {chunk} | {shape} | {r['tokens_per_s']:,} | {r['mfu']:.1%} "
            f"| {r['step_ms']:.1f} | {ratio} | {r['peak_mem_gib']:.1f} |"
        )
    dec = [r for r in rows if r["bench"] == "decode"]
    if dec:
        out += [
            "",
            "| decode | batch | tokens/s | ms/token | TTFT ms | XLA flags |",
            "|---|---|---|---|---|---|",
        ]
        out += [
            f"| {r['preset']} {r['dtype']} | {r['batch']} | {r['tokens_per_s']:,.0f} "
            f"| {r['ms_per_token']:.2f} | {r['ttft_ms']:.1f} | {r.get('xla_flags') or '-'} |"
            for r in dec
        ]
    att = [r for r in rows if r["bench"] == "attention"]
    if att:
        out += [
            "",
            "| attention fwd+bwd | docs | xla ms | fused ms | max rel. error (out, dq, dk, dv) |",
            "|---|---|---|---|---|",
        ]
        for r in att:
            fused = next((r[k] for k in ("cudnn_ms", "splash_ms") if k in r), None)
            errs = ", ".join(f"{r[k]:.3f}" for k in r if k.startswith("rel_err_"))
            extra = (
                f" (table of {r['cudnn_fit_runs']} runs: {r['cudnn_fit_ms']} ms)"
                if "cudnn_fit_ms" in r
                else ""
            )
            out.append(
                f"| {r['shape']} | {r['docs']} | {r['xla_ms']} | {fused}{extra} | {errs or '-'} |"
            )
    return "\n".join(out)


def main() -> None:
    with open(sys.argv[1]) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    print(table(rows))


if __name__ == "__main__":
    main()
