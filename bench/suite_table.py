"""The Markdown table of a `bench/gpu_suite.sh` run, from its results.jsonl.

One line per training measurement (jax and torch), with each jax step's tokens/s as a ratio
to the torch.compile step of the same preset and shape measured in the same run; then the
decode and attention-kernel rows.

    python bench/suite_table.py bench_out/results.jsonl > bench_out/table.md
"""

from __future__ import annotations

import json
import sys


def table(rows: list[dict]) -> str:
    torch = {(r["preset"], r["batch"], r["seq_len"]): r for r in rows if r["bench"] == "torch"}
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
            base = torch.get((r["preset"], r["batch"], r["seq_len"]))
            ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        out.append(
            f"| {name} | {attn} | {chunk} | {shape} | {r['tokens_per_s']:,} | {r['mfu']:.1%} "
            f"| {r['step_ms']:.1f} | {ratio} | {r['peak_mem_gib']:.1f} |"
        )
    dec = [r for r in rows if r["bench"] == "decode"]
    if dec:
        out += ["", "| decode | batch | tokens/s | ms/token | TTFT ms |", "|---|---|---|---|---|"]
        out += [
            f"| {r['preset']} {r['dtype']} | {r['batch']} | {r['tokens_per_s']:,.0f} "
            f"| {r['ms_per_token']:.2f} | {r['ttft_ms']:.1f} |"
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
