"""`stage: pretrain` as a user runs it: resume after SIGKILL, or after a SIGTERM that saves
the step it arrives in, reproduces the uninterrupted run's losses, a diverging run stops naming the step, a checkpoint of another model is refused."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxllm.config import MeshConfig, ModelConfig, OptimConfig
from jaxllm.main import main
from jaxllm.sharding import make_mesh
from jaxllm.trainers.lm import model_fn
from jaxllm.training.checkpoint import Checkpointer, CheckpointMismatch
from jaxllm.training.optim import make_optimizer
from jaxllm.training.state import create_train_state

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Cleaned data + a small tokenizer from the shipped corpus, once for this module."""
    out = tmp_path_factory.mktemp("prep")
    data, tok = out / "data", out / "tok"
    common = ["--set", "progress=false"]
    assert (
        main(
            [
                "--config",
                str(ROOT / "configs/tiny_data.yaml"),
                *common,
                "--set",
                f"output_dir={data}",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "--config",
                str(ROOT / "configs/tiny_tokenizer.yaml"),
                *common,
                "--set",
                f"output_dir={tok}",
                "--set",
                f"inputs.data_dir={data}",
                "--set",
                "tokenizer.vocab_size=1000",
                "--set",
                "tokenizer.character_coverage=0.98",
            ]
        )
        == 0
    )
    return data, tok / "tokenizer.model"


def pretrain_cmd(prepared, out, steps=80, **extra):
    data, tok = prepared
    sets = {
        "output_dir": out,
        "progress": "false",
        "inputs.data_dir": data,
        "inputs.tokenizer": tok,
        "model.d_model": 32,
        "model.n_layers": 2,
        "model.n_heads": 2,
        "model.d_ff": 64,
        "model.max_seq_len": 32,
        "loader.seq_len": 32,
        "loader.batch_size": 4,
        "train.steps": steps,
        "train.log_every": 1,
        "train.eval_every": 0,
        "train.eval_batches": 2,
        "train.checkpoint_every": 10,
        "train.optim.warmup_steps": 5,
        "model.dropout": 0.1,
        **extra,
    }
    args = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    return [sys.executable, "-m", "jaxllm.main", "--config", "configs/tiny_pretrain.yaml", *args]


def env1():
    return {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}


def losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def full(prepared, tmp_path_factory):
    """The uninterrupted 80-step run the interrupted ones are compared with."""
    out = tmp_path_factory.mktemp("full") / "run"
    subprocess.run(
        pretrain_cmd(prepared, out), cwd=ROOT, env=env1(), check=True, capture_output=True
    )
    return out


@pytest.mark.slow  # 27 s; exact resume stays fast in the stage tests (sft, dpo, early stopping)
def test_sigkill_then_resume_reproduces_losses(prepared, full, tmp_path):
    summary = json.loads((full / "summary.json").read_text())
    assert summary["val_loss"] < summary["unigram_val_loss"] + 1.0
    assert (full / "loss.png").stat().st_size > 1000

    killed = tmp_path / "killed"
    cmd = pretrain_cmd(prepared, killed)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env1(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "20").is_dir() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it was killed"
    done = subprocess.run(cmd, cwd=ROOT, env=env1(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout
    a, b = losses(full), losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 81))
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-6)
    assert json.loads((killed / "summary.json").read_text())["resumed_from_step"] >= 20


@pytest.mark.slow  # 20 s: two runs beside the shared uninterrupted one
def test_sigterm_saves_where_it_is_and_the_rerun_resumes_exactly(prepared, full, tmp_path):
    """A preemption notice between checkpoints (every 10 steps) loses no step: the run saves
    the step it is at, exits 143, and the same command goes on from there."""
    run = tmp_path / "run"
    cmd = pretrain_cmd(prepared, run)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env1(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while (
        time.time() < deadline
        and max(losses(run) if (run / "metrics.jsonl").exists() else [0]) < 13
    ):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    stop = saved[-1]
    assert 13 <= stop < 80 and stop % 10, saved  # not a scheduled checkpoint: its own
    line = err.strip().splitlines()[-1]
    assert (
        line.startswith(f"preempted (SIGTERM) after step {stop}: checkpoint ") and "resume" in line
    )
    assert max(losses(run)) == stop  # every step it trained is logged, none after
    assert not (run / "summary.json").exists()
    done = subprocess.run(cmd, cwd=ROOT, env=env1(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["resumed_from_step"] == stop
    a, b = losses(full), losses(run)
    assert sorted(a) == sorted(b) == list(range(1, 81))
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-6)


def test_divergence_stops_naming_the_step(prepared, tmp_path, capsys):
    over = {"train.optim.lr": 1e30, "train.optim.grad_clip": 0, "loader.batch_size": 8}
    cmd = pretrain_cmd(prepared, tmp_path / "nan", steps=40, **over)  # in-process: 8 devices
    code = main(cmd[3:])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: step ") and "loss is nan" in err.lower()
    assert err.count("\n") == 1


def test_restore_into_another_shape_names_the_parameter(tmp_path):
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    tx = make_optimizer(OptimConfig(), 10)
    small = ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=8)
    big = ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, d_ff=48, max_seq_len=8)
    _, state, _ = create_train_state(model_fn(small, 0), tx, mesh, "dp", 0)
    ckpt = Checkpointer(tmp_path / "ck", async_save=False)
    ckpt.save(1, state, {"step": 1})
    ckpt.wait()
    _, other, sh = create_train_state(model_fn(big, 0), tx, mesh, "dp", 0)
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), other, sh
    )
    with pytest.raises(
        CheckpointMismatch, match=r"parameter 'params\.blocks\.0\.mlp\.down' has shape \(32, 16\)"
    ):
        ckpt.restore(1, target)
    ckpt.close()


@pytest.mark.slow  # 15 s: two pretrain runs; an opt-in speed option (`compile_cache`)
def test_compile_cache_is_written_then_read(prepared, tmp_path):
    """`compile_cache`: the first run writes its compiled programs there; a second run of the
    same config reads every one of them back (jax logs each hit under JAX_LOG_COMPILES),
    compiles nothing new and gives the same losses."""
    cache = tmp_path / "xla"
    env = {k: v for k, v in env1().items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # cache even sub-second compiles
    env["JAX_LOG_COMPILES"] = "1"
    hit = "Persistent compilation cache hit for 'jit_"
    entries, hits = {}, {}
    for name in ("first", "second"):
        cmd = pretrain_cmd(prepared, tmp_path / name, steps=3, compile_cache=cache)
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        entries[name] = sorted(p.name for p in cache.iterdir())
        hits[name] = done.stderr.count(hit)
    assert any(e.startswith("jit_step-") for e in entries["first"])  # the train step
    assert hits["first"] == 0 and len(entries["first"]) >= 2
    assert entries["second"] == entries["first"]  # nothing compiled (every miss is written)
    assert hits["second"] == len(entries["first"])  # and every entry read
    assert losses(tmp_path / "second") == losses(tmp_path / "first")


def test_checkpoint_keeps_this_process_data_position(tmp_path):
    """The data position is read when the save starts (the loop moves on at once) and put
    back by the restore; an older checkpoint's position in the metadata still restores."""
    import grain
    import jax.numpy as jnp

    def stream():
        return iter(grain.MapDataset.range(50).to_iter_dataset())

    state = {"w": jnp.arange(3.0)}
    target = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
    ckpt = Checkpointer(tmp_path / "ck", keep=3)
    it = stream()
    for _ in range(7):
        next(it)
    ckpt.save(1, state, {"step": 1}, data=it)
    assert next(it) == 7  # moving on while the save runs
    ckpt.save(2, state, {"step": 2, "data_state": it.get_state()})  # the older layout
    ckpt.wait()
    assert sorted(p.name for p in (tmp_path / "ck/1/data").glob("process_*")) == [
        "process_0-of-1.json"
    ]
    for step, expected in ((1, 7), (2, 8)):
        fresh = stream()
        restored, meta = ckpt.restore(step, target, data=fresh)
        assert next(fresh) == expected and meta["step"] == step
        np.testing.assert_array_equal(restored["w"], state["w"])
    ckpt.close()
