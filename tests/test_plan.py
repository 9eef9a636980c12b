"""`--plan`: per-device bytes against the closed form, the compiled step's memory, the fit
verdict and its advice, and the simulated-device re-run of the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxllm.config import load_config
from jaxllm.models.flops import param_count
from jaxllm.trainers.plan import make_plan, plan_model, report

ROOT = Path(__file__).resolve().parents[1]
# llama_1b.yaml names the demo's tokenizer: after `make demo` the plan would take its small
# vocabulary; without a tokenizer it takes the preset's (Llama 3's 128,256), as in a clone.
PRESET_VOCAB = ['inputs.tokenizer=""']


def test_llama_1b_on_8_fsdp_devices_matches_the_closed_form():
    cfg = load_config(ROOT / "configs/llama_1b.yaml", ["mesh.rules=fsdp", *PRESET_VOCAB])
    p = make_plan(cfg, "h100", compile_step=False)
    n = param_count(plan_model(cfg))
    assert p["devices"] == 8 and p["mesh"]["fsdp"] == 8
    # f32 weights split 8 ways (norm scales stay whole: a few kB more), Adam's two moments
    assert p["param_bytes"] == pytest.approx(4 * n / 8, rel=0.01)
    assert p["optimizer_bytes"] == pytest.approx(2 * 4 * n / 8, rel=0.01)
    assert p["model_flops_per_step"] > 6 * n * p["tokens_per_step"]  # + attention
    assert p["fits"]


def test_a_config_that_does_not_fit_says_which_knob_helps():
    cfg = load_config(
        ROOT / "configs/llama_1b.yaml",
        ["mesh.fsdp=1", "mesh.data=-1", "mesh.rules=dp", "loader.batch_size=8", *PRESET_VOCAB],
    )
    p = make_plan(cfg, "v5e", compile_step=False)
    assert not p["fits"] and p["param_bytes"] == pytest.approx(
        4 * param_count(plan_model(cfg)), rel=0.01
    )
    text = "\n".join(report(p, cfg))
    assert "DOES NOT FIT" in text and "mesh.fsdp" in text


def test_compiled_step_memory_and_flops():
    cfg = load_config(
        ROOT / "configs/tiny_pretrain.yaml",
        ["model.vocab_size=512", "loader.batch_size=8", "mesh.data=-1"],
    )
    p = make_plan(cfg, "h100")
    assert p["temp_bytes"] > 0 and p["xla_flops_per_device"] > 0
    assert p["loss_chunk"] == 0  # auto as an H100 resolves it (this CPU would fuse: 32)
    # the donated state comes back as the outputs: arguments hold at least params + optimizer
    assert p["argument_bytes"] >= p["param_bytes"] + p["optimizer_bytes"]
    assert p["peak_bytes"] >= p["argument_bytes"]
    assert p["step_s_at_mfu"] == pytest.approx(p["model_flops_per_step"] / (8 * 989e12 * 0.4))


def test_cli_plans_on_simulated_devices_and_refuses_other_stages():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device here
    cmd = [sys.executable, "-m", "jaxllm.main", "--config", "configs/tiny_pretrain.yaml",
           "--set", "model.vocab_size=512", "--plan", "--devices", "2", "--no-compile"]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1])["devices"] == 2
    bad = subprocess.run(
        [sys.executable, "-m", "jaxllm.main", "--config", "configs/tiny_sft.yaml", "--plan"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "plans stage: pretrain configs" in bad.stderr
