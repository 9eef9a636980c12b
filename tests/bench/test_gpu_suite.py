"""bench/gpu_suite.sh: its table's arithmetic, and the whole suite in smoke mode on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from profile_summary import kind, summary  # noqa: E402
from suite_best import choose  # noqa: E402
from suite_table import table  # noqa: E402


def test_table_ratios_against_torch_of_the_same_shape():
    rows = [
        dict(bench="torch", preset="gpt2_124m", params=124_475_904, compiled=True, batch=64,
             seq_len=1024, tokens_per_s=400_000, mfu=0.35, step_ms=163.8, peak_mem_gib=60.0),
        dict(bench="mfu", label="jax", preset="gpt2_124m", params=124_475_904, attention="cudnn",
             loss_chunk=0, docs="one", batch=64, seq_len=1024, tokens_per_s=500_000, mfu=0.43,
             step_ms=131.0, peak_mem_gib=40.0),
        dict(bench="mfu", label="other", preset="gpt2_124m", params=124_475_904, attention="xla",
             loss_chunk=0, docs="packed", batch=32, seq_len=1024, tokens_per_s=100, mfu=0.1,
             step_ms=1.0, peak_mem_gib=1.0),
    ]  # fmt: skip
    lines = table(rows).splitlines()
    assert "| jax | cudnn | 0 | 64 x 1024 | 500,000 | 43.0% | 131.0 | 1.25x | 40.0 |" in lines
    assert any(
        line.startswith("| other | xla (packed docs) |") and "| - |" in line for line in lines
    )


def test_table_ratio_needs_the_same_model_not_only_the_preset():
    """A config that overrides the preset's shape (tiny_pretrain.yaml: d_model 192 on the tiny
    preset) is another model than the bare preset: no ratio to it, one to the same model."""
    row = dict(compiled=False, batch=4, seq_len=64, mfu=0.1, step_ms=1.0, peak_mem_gib=0.0)
    jax_row = dict(row, bench="mfu", label="tiny-one", preset="tiny", params=1_902_720,
                   attention="xla", loss_chunk=32, docs="one", tokens_per_s=6000)  # fmt: skip
    bare = dict(row, bench="torch", preset="tiny", params=16_102_912, tokens_per_s=1500)
    same = dict(row, bench="torch", preset="tiny", params=1_902_720, tokens_per_s=4000)
    old = {k: v for k, v in same.items() if k != "params"}  # results written before params

    def ratio(rows):
        line = next(x for x in table(rows).splitlines() if x.startswith("| tiny-one |"))
        return line.split(" | ")[7]

    assert ratio([bare, jax_row]) == "-"
    assert ratio([bare, same, jax_row]) == f"{6000 / 4000:.2f}x"
    assert ratio([old, jax_row]) == "-"


def _mfu(label, tps, sets=(), flags="", docs="one", batch=16):
    return dict(bench="mfu", label=label, tokens_per_s=tps, sets=list(sets), xla_flags=flags,
                docs=docs, batch=batch, seq_len=1024)  # fmt: skip


def test_best_combination_takes_each_change_that_paid():
    q = ["train.grad_accum=1", "loader.batch_size=16"]
    rows = [
        _mfu("b", 100_000, q),
        _mfu("b-unrolled", 110_000, q + ["model.scan_layers=false"]),  # +10 %: taken
        _mfu("b-bf16", 101_000, q + ["model.logits_dtype=bfloat16"]),  # +1 %: below the gain
        _mfu("b-chunk128", 104_000, q + ["train.loss_chunk=128"]),  # one key, two values:
        _mfu("b-chunk256", 106_000, q + ["train.loss_chunk=256"]),  # the faster one
        _mfu("b-notriton", 103_000, q, "--xla_gpu_enable_triton_gemm=false"),  # taken
        _mfu("b-noz", 120_000, q + ["train.z_loss=0"]),  # diagnostic: excluded
        _mfu("b-two", 150_000, q + ["model.remat=dots", "train.loss_chunk=64"]),  # not an ablation
        _mfu("b-nomask", 150_000, q + ["model.remat=dots"], docs="none"),  # other rows
        _mfu("other", 200_000, q + ["model.remat=full"]),  # not b's
        dict(bench="torch", label="b-torch", tokens_per_s=300_000),
    ]
    sets, flags, reasons = choose(rows, "b", exclude=("train.z_loss",))
    assert sorted(sets) == ["model.scan_layers=false", "train.loss_chunk=256"]
    assert flags == ["--xla_gpu_enable_triton_gemm=false"]
    assert any("b-noz" in r and "excluded" in r for r in reasons)
    assert any("b-two" in r and "not an ablation" in r for r in reasons)
    assert choose(rows, "missing")[:2] == ([], [])


def test_profile_groups_kernel_names_and_sums_per_step():
    assert kind("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention"
    assert kind("nvjet_tst_128x256_64x4_1x2_h_bz_coopB_TNT") == "matmul"
    assert kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert kind("aten::addmm") == kind("aten::mm") == "matmul"
    assert kind("loop_add_fusion") == kind("input_reduce_fusion_3") == "other"
    assert kind("Memcpy DtoD (Device -> Device)") == "copy"
    assert kind("ncclDevKernel_AllReduce_Sum_f32_RING_LL") == "communication"
    lines = summary({"gemm_a": (6e6, 6), "loop_add_fusion": (3e6, 3), "fmha_b": (3e6, 3)}, steps=3)
    assert lines[0] == "busy 4.00 ms per step over 3 steps"
    assert lines[1].split() == ["matmul", "2.00", "ms", "50.0%"]
    assert lines[-3].split() == ["2.000", "2.0", "matmul", "gemm_a"]


@pytest.mark.slow
def test_suite_smoke_runs_every_bench(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    env["PYTHON"] = sys.executable
    subprocess.run(
        ["bash", "bench/gpu_suite.sh", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, env=env, check=True, timeout=900, capture_output=True,
    )  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {r["bench"] for r in rows} == {"attention", "mfu", "torch", "decode"}
    for r in rows:
        if r["bench"] == "attention":  # splash (interpret mode) against xla, bf16 inputs
            assert max(v for k, v in r.items() if k.startswith("rel_err_")) < 0.02
        if r["bench"] == "mfu" and not r["quick_init"]:  # random init: ~ ln 512
            assert r["tokens_per_s"] > 0 and abs(r["first_loss"] - 6.24) < 0.3
        if r["bench"] == "mfu" and r["quick_init"]:  # the pattern's weights: finite, not random
            assert r["tokens_per_s"] > 0 and np.isfinite(r["first_loss"])
            assert abs(r["first_loss"] - 6.24) > 0.3
    # the torch baseline is the jax rows' model: tiny_pretrain.yaml's d 192, 4 layers, d_ff 768,
    # vocab 512, 128 positions; per block 2 LayerNorms, qkv, out, fc, proj (with biases)
    d, f, n_layers, vocab, positions = 192, 768, 4, 512, 128
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
    params = n_layers * block + 2 * d + vocab * d + positions * d
    assert {r["params"] for r in rows if r["bench"] in ("mfu", "torch")} == {params}
    text = (tmp_path / "table.md").read_text()
    assert "tiny-packed" in text and "vs torch" in text
    tiny_one = next(line for line in text.splitlines() if line.startswith("| tiny-one |"))
    assert tiny_one.split(" | ")[7].endswith("x")  # a ratio to the torch row of that model
    log = (tmp_path / "log.txt").read_text()
    assert "gpu_suite.sh done" in log
    # the combined step ran, profiled (its trace and HLO kept), and so did torch's
    assert any(r.get("label") == "tiny-best" for r in rows)
    assert (tmp_path / "tiny-best.xplane.pb").stat().st_size > 0
    assert "ENTRY" in (tmp_path / "tiny-best.hlo.txt").read_text()
    assert "profile /host:CPU:" in log and "profile torch:" in log
