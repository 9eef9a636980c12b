"""`--plan`: per-device bytes against the closed form, the compiled step's memory, the fit
verdict and its advice, and the simulated-device re-run of the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jaxllm.config import load_config
from jaxllm.errors import ConfigError
from jaxllm.main import main
from jaxllm.models.flops import param_count
from jaxllm.trainers.plan import hlo_matmul_flops, make_plan, plan_model, report
from jaxllm.training.peak import HARDWARE

GiB, MiB = 2**30, 2**20

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
    assert p["fits"] is None  # the state fits; without activations that is no verdict


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
    assert "DOES NOT FIT: the state alone" in text and "mesh.fsdp" in text


def test_no_compile_gives_no_fit_verdict_from_the_state_alone():
    # gpt2_124m.yaml compiled needs ~146 GiB (activations); its state alone is ~1.9 GiB
    cfg = load_config(ROOT / "configs/tiny_pretrain.yaml", ["model.vocab_size=512"])
    p = make_plan(cfg, "h100", compile_step=False)
    n = param_count(plan_model(cfg))
    # dp: every device holds f32 weights, gradients and Adam's two moments (+ a step count)
    assert p["state_bytes"] == pytest.approx(4 * 4 * n, rel=1e-3)
    assert p["fits"] is None and "peak_bytes" not in p
    text = "\n".join(report(p, cfg))
    assert "state only (activations not counted)" in text
    assert "fits:" not in text and "DOES NOT FIT" not in text


def test_compiled_step_memory_and_flops():
    # scanned layers and 2 micro-batches: both loops XLA's cost analysis counts once
    cfg = load_config(
        ROOT / "configs/tiny_pretrain.yaml",
        ["model.vocab_size=512", "loader.batch_size=8", "mesh.data=-1", "loader.seq_len=64",
         "model.scan_layers=true", "train.grad_accum=2"],
    )  # fmt: skip
    p = make_plan(cfg, "h100")
    assert p["temp_bytes"] > 0 and p["xla_flops_per_device"] > 0
    # the step's matmuls by hand: per token forward 2 x (L (4 d^2 + 2 d f) + d V) for the
    # weights and 2 x 2 S d per layer for QK^T and PV; backward twice the forward
    d, f, n_l, v, s = 192, 768, 4, 512, 64
    tokens = 8 * 64 * 2
    by_hand = 3 * tokens * (2 * (n_l * (4 * d * d + 2 * d * f) + d * v) + n_l * 4 * s * d)
    assert p["matmul_flops_per_device"] * p["devices"] == pytest.approx(by_hand, rel=1e-6)
    assert p["xla_flops_per_device"] * p["devices"] < 0.5 * by_hand  # what it used to show
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


def test_matmul_flops_count_every_loop_trip():
    m, k, n = 8, 16, 4

    def f(x, w):  # 3 outer x 5 inner steps of x @ w[i] and one matmul outside the loops
        def inner(x, w_i):
            return jnp.tanh(x @ w_i), None

        def outer(x, _):
            return jax.lax.scan(inner, x, w)[0], None

        return jax.lax.scan(outer, x, None, length=3)[0] @ jnp.ones((k, n))

    args = (jnp.ones((m, k)), jnp.ones((5, k, k)))
    text = jax.jit(f).lower(*args).compile().as_text()
    assert hlo_matmul_flops(text) == 3 * 5 * 2 * m * k * k + 2 * m * k * n


def test_hardware_memory_is_the_cards_total_in_bytes():
    # NVML's totals (nvidia-smi MiB) of the cards; TPU HBM per chip in GiB
    nvml_mib = {"h100": 81_559, "h100_pcie": 81_559, "h100_nvl": 95_830, "h200": 143_771,
                "a100": 81_920, "l4": 23_034, "l40s": 46_068}  # fmt: skip
    for name, mib in nvml_mib.items():
        assert HARDWARE[name][1] == mib * MiB, name
    assert [HARDWARE[t][1] / GiB for t in ("v4", "v5e", "v5p", "v6e")] == [32, 16, 95, 32]
    # a plan needing 135 GiB fits an H200 (140.4 GiB), and the report says so in GiB
    cfg = load_config(ROOT / "configs/tiny_pretrain.yaml", ["model.vocab_size=512"])
    p = make_plan(cfg, "h200", compile_step=False)
    p.update(peak_bytes=135 * GiB, fits=135 * GiB <= p["hardware_memory_bytes"])
    assert report(p, cfg)[-1] == "  fits: about 135.0 of 140.4 GiB per device"


@pytest.mark.parametrize("mfu", ["0", "40", "nan", "-0.5"])
def test_mfu_outside_0_1_is_refused_in_one_line(mfu, capsys):
    args = ["--config", str(ROOT / "configs/tiny_pretrain.yaml"), "--set", "model.vocab_size=512",
            "--plan", "--no-compile", "--mfu", mfu]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: --mfu: expected a fraction in (0, 1]")
    with pytest.raises(ConfigError, match="--mfu"):
        make_plan(load_config(ROOT / "configs/tiny_pretrain.yaml", ["model.vocab_size=512"]),
                  mfu=float(mfu), compile_step=False)  # fmt: skip


def _target(cfg, hardware: str) -> dict:
    """`lower_for_target` alone (no compile for this host's memory figures)."""
    from jaxllm.sharding import make_mesh
    from jaxllm.trainers.plan import lower_for_target
    from jaxllm.training.optim import make_optimizer

    tx = make_optimizer(cfg.train.optim, cfg.train.steps)
    return lower_for_target(cfg, plan_model(cfg), tx, make_mesh(cfg.mesh), hardware)


def _barriers(cfg, platform: str) -> int:
    """optimization_barriers (the CPU-only layout tricks) in the step traced for `platform`."""
    from jaxllm.models.target import lowering_for
    from jaxllm.sharding import make_mesh
    from jaxllm.trainers.lm import model_fn
    from jaxllm.trainers.plan import _traced_step
    from jaxllm.training.optim import make_optimizer
    from jaxllm.training.state import train_state_spec

    mesh, tx = make_mesh(cfg.mesh), make_optimizer(cfg.train.optim, cfg.train.steps)
    with lowering_for(platform):
        spec = train_state_spec(model_fn(plan_model(cfg), 0), tx, mesh, cfg.mesh.rules, 0)
        return str(_traced_step(cfg, spec, tx, mesh, 0).jaxpr).count("optimization_barrier")


def _tiny(*sets: str):
    return load_config(
        ROOT / "configs/tiny_pretrain.yaml",
        ["model.vocab_size=512", "loader.batch_size=8", "mesh.data=-1", *sets],
    )


@pytest.mark.parametrize("seq_len", [200, 384])
def test_a_tpu_plan_lowers_the_step_with_its_splash_kernels(seq_len):
    """On this CPU host the plan lowers a v5e's program: splash attention as three distinct
    Mosaic kernels (forward, dq and dkv backward; the four layers call the same ones). 200
    positions are padded to 256, 384 run in 128-blocks."""
    cfg = _tiny(f"loader.seq_len={seq_len}", f"model.max_seq_len={seq_len}")
    want = {"platform": "tpu", "attention": "splash", "lowered": True, "fused_kernels": 3}
    if seq_len == 384:
        assert _target(cfg, "v5e") == want
        # the CPU's layout tricks stay out of the accelerator's program
        assert _barriers(cfg, "cpu") > 0 and _barriers(cfg, "tpu") == _barriers(cfg, "gpu") == 0
        return
    p = make_plan(cfg, "v5e")  # the whole plan, as the CLI prints it
    assert p["target_lowering"] == want
    assert (
        "TPU program (v5e), attention splash: lowers from this host (3 distinct Mosaic"
        in "\n".join(report(p, cfg))
    )


def test_a_gpu_plan_says_cudnn_is_not_lowered_off_a_gpu_and_lowers_the_xla_path():
    from jaxllm.trainers.plan import _lowering_line

    low = _target(_tiny("model.dtype=bfloat16"), "h100")
    assert low == {"platform": "gpu", "attention": "cudnn", "lowered": None}
    assert _lowering_line(low, "h100").endswith(
        "not lowered here (cuDNN attention traces only on a GPU host)"
    )
    low = _target(_tiny(), "a100")  # f32: the xla path
    assert low == {"platform": "gpu", "attention": "xla", "lowered": True, "fused_kernels": 0}


def test_an_explicit_kernel_is_planned_on_this_host_and_checked_on_the_target():
    """`model.attention: splash` cannot run on this CPU: the memory estimate takes the host's
    kernel (the plan builds the model), and the target lowering says whether the target can run the
    configured one."""
    cfg = _tiny("model.attention=splash")
    assert make_plan(cfg, "v5p", compile_step=False)["param_bytes"] > 0
    assert _target(cfg, "v5p")["lowered"] is True
    assert _target(cfg, "h100") == {
        "platform": "gpu", "attention": "splash", "lowered": False,
        "error": "config key 'model.attention': 'splash' needs a TPU, this is gpu; use auto or xla",
    }  # fmt: skip
