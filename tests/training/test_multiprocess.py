"""`stage: pretrain` on two real processes × 4 CPU devices (joined by `jax.distributed` from
the environment, gloo collectives) on an fsdp × tensor mesh: the same losses as one process
× 8 devices reading the same global batches; only process 0 writes the run files; each
process saves its own data position; a run killed on both resumes exactly, and a SIGTERM to
one process stops both at one saved step."""

import json
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from jaxllm.data.pipeline import make_eval_dataset
from jaxllm.main import main
from jaxllm.trainers import pretrain
from tests.multiprocess import Group, as_if_processes, main_args, series
from tests.sft.conftest import sft_texts

CONFIG = "configs/tiny_pretrain.yaml"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Train and val shards; the val docs split into different batch counts per process."""
    data = tmp_path_factory.mktemp("mp") / "data"
    texts = sft_texts(400)
    val = [t * 3 if i % 2 == 0 else t for i, t in enumerate(texts[:9])]  # process 0: longer
    for split, rows in (("train", texts[9:]), ("val", val)):
        (data / split).mkdir(parents=True)
        lines = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in rows)
        (data / split / "shard-00000.jsonl").write_text(lines, encoding="utf-8")
    return data


def settings(data: Path, tok, out: Path, **extra) -> dict:
    return {
        "output_dir": out, "progress": "false", "inputs.data_dir": data,
        "inputs.tokenizer": tok.path, "model.d_model": 32, "model.n_layers": 1,
        "model.n_heads": 2, "model.d_ff": 64, "model.max_seq_len": 32, "model.dropout": 0.0,
        "loader.seq_len": 32, "loader.batch_size": 8,
        "mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2, "mesh.rules": "fsdp_tp",
        "train.steps": 4, "train.log_every": 1, "train.eval_every": 2,
        "train.checkpoint_every": 2, "train.eval_batches": 0, "train.keep_checkpoints": 3,
        "train.optim.warmup_steps": 1, **extra,
    }  # fmt: skip


def reference(monkeypatch, sets: dict) -> None:
    """One process × 8 devices fed the global batches two processes read (their rows in
    process order), through the same CLI."""
    for name in ("make_lm_dataset", "make_eval_dataset"):
        monkeypatch.setattr(pretrain, name, as_if_processes(getattr(pretrain, name), 2))
    args = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    assert main(["--config", CONFIG, *args]) == 0


def run_files(writes: list[dict]) -> set[str]:
    """The top-level run-directory entries a process wrote outside checkpoints/."""
    return {Path(w["path"]).parts[0] for w in writes if w["path"] != "."} - {"checkpoints"}


def test_two_processes_train_like_one_and_only_process_0_writes(
    data_dir, tok, tmp_path, monkeypatch, capsys
):
    counts = [
        sum(1 for _ in make_eval_dataset(
            [data_dir / "val/shard-00000.jsonl"], tok, pretrain_loader(), process_index=i,
            process_count=2))
        for i in (0, 1)
    ]  # fmt: skip
    assert counts[0] > counts[1]  # so the eval must top process 1 up to stay in step
    out = tmp_path / "two"
    group = Group(main_args(CONFIG, out, settings(data_dir, tok, out)), tmp_path / "logs")
    outs = group.wait(timeout=300)
    ref = tmp_path / "one"
    reference(monkeypatch, settings(data_dir, tok, ref))

    for key in ("loss", "eval_loss"):
        a, b = series(out, key), series(ref, key)
        assert sorted(a) == sorted(b) == ([1, 2, 3, 4] if key == "loss" else [2, 4])
        np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(b)], rtol=2e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == 0 and summary["steps"] == 4
    assert all("done:" in o for o in outs)
    # the run files are process 0's alone; process 1 wrote only into checkpoints/
    mine, theirs = run_files(group.writes(0)), run_files(group.writes(1))
    assert {"config.yaml", "summary.json", "metrics.jsonl", "loss.png"} <= mine, mine
    assert theirs == set(), theirs
    assert any(w["path"].startswith("checkpoints") for w in group.writes(1))
    # each process saved its own data position
    saved = sorted(p.name for p in (out / "checkpoints/4/data").glob("process_*"))
    assert saved == ["process_0-of-2.json", "process_1-of-2.json"]
    states = [json.loads((out / "checkpoints/4/data" / n).read_text()) for n in saved]
    assert states[0] != states[1]
    # resuming those positions on another number of processes is refused, in one line
    monkeypatch.undo()
    (out / "summary.json").unlink()
    args = [x for k, v in settings(data_dir, tok, out).items() for x in ("--set", f"{k}={v}")]
    assert main(["--config", CONFIG, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "saved by 2 processes, this run has 1" in err, err


LONG = {"train.steps": 60, "train.checkpoint_every": 5, "train.eval_every": 30}


@pytest.fixture(scope="module")
def full(data_dir, tok, tmp_path_factory) -> Path:
    """The uninterrupted 60-step pair the interrupted ones are compared with."""
    out = tmp_path_factory.mktemp("full")
    Group(
        main_args(CONFIG, out / "run", settings(data_dir, tok, out / "run", **LONG)), out / "l"
    ).wait()
    return out / "run"


@pytest.mark.slow
def test_two_processes_killed_together_resume_exactly(data_dir, tok, full, tmp_path):
    """SIGKILL both processes after a checkpoint; the restarted pair resumes each from its
    own data position and logs the uninterrupted pair's losses."""
    sets = LONG
    killed = tmp_path / "killed"
    args = main_args(CONFIG, killed, settings(data_dir, tok, killed, **sets))
    Group(args, tmp_path / "l1").kill_when(killed / "checkpoints/10")
    assert not (killed / "summary.json").exists(), "the run finished before it was killed"
    outs = Group(args, tmp_path / "l2").wait()
    assert all("resumed from" in o for o in outs)
    resumed = json.loads((killed / "summary.json").read_text())["resumed_from_step"]
    assert 10 <= resumed < 60
    for key in ("loss", "eval_loss"):
        a, b = series(full, key), series(killed, key)
        assert sorted(a) == sorted(b)
        np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-6)


def wait_for_step(run: Path, step: int, timeout: float = 300) -> None:
    """Until the run's metrics log a loss at `step` or later."""
    deadline = time.time() + timeout
    while (
        time.time() < deadline
        and max(series(run, "loss") if (run / "metrics.jsonl").exists() else [0]) < step
    ):
        time.sleep(0.05)


def wait_for_save(run: Path, step: int, timeout: float = 120) -> None:
    """Until the checkpoint of `step` is committed (its directory has its final name): an
    asynchronous save can still be in flight a few steps after it began."""
    deadline = time.time() + timeout
    while time.time() < deadline and not (run / "checkpoints" / str(step)).is_dir():
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_saved_step(data_dir, tok, full, tmp_path):
    """A preemption notice reaches one host: jax's preemption service agrees a step with the
    other, both save it (each its own data position) and exit 143; the rerun pair resumes
    there and logs the uninterrupted pair's losses."""
    run = tmp_path / "run"
    args = main_args(
        CONFIG, run, settings(data_dir, tok, run, **{**LONG, "train.checkpoint_every": 50})
    )
    group = Group(args, tmp_path / "l1")
    wait_for_step(run, 12)
    group.procs[1].send_signal(signal.SIGTERM)
    outs = group.wait(timeout=120, code=143)
    stops = [re.findall(r"preempted \(SIGTERM\) after step (\d+)", o) for o in outs]
    assert stops[0] == stops[1] and len(stops[0]) == 1, outs
    stop = int(stops[0][0])
    assert 12 <= stop < 50
    saved = sorted(p.name for p in (run / f"checkpoints/{stop}/data").glob("process_*"))
    assert saved == ["process_0-of-2.json", "process_1-of-2.json"]
    outs = Group(args, tmp_path / "l2").wait()
    assert json.loads((run / "summary.json").read_text())["resumed_from_step"] == stop
    for key in ("loss", "eval_loss"):
        a, b = series(full, key), series(run, key)
        assert sorted(a) == sorted(b)
        np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-6)


@pytest.mark.slow
def test_sigterm_without_the_preemption_service_ends_like_a_crash(data_dir, tok, full, tmp_path):
    """jax's preemption service turned off (JAX_ENABLE_PREEMPTION_SERVICE=false): a process
    that saved alone would hang the other's collective save, so SIGTERM keeps its default
    meaning. The process that gets it dies at once (no save at its step, no "preempted"
    line), the other is stopped as after a crashed host, and the rerun resumes from the last
    periodic checkpoint with the uninterrupted pair's losses."""
    run = tmp_path / "run"
    args = main_args(CONFIG, run, settings(data_dir, tok, run, **LONG))  # saves every 5 steps
    group = Group(args, tmp_path / "l1", more_env={"JAX_ENABLE_PREEMPTION_SERVICE": "false"})
    wait_for_step(run, 12)
    wait_for_save(run, 10)  # under load, step 10's async save may still be in flight
    group.procs[1].send_signal(signal.SIGTERM)
    assert group.procs[1].wait(timeout=60) == -signal.SIGTERM
    group.kill()  # process 0 waits in a collective for its dead peer: a scheduler ends it
    outs = group.outputs()
    assert not any("preempted" in o for o in outs), outs[1][-2000:]
    assert not (run / "summary.json").exists()
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and all(s % 5 == 0 for s in saved), saved  # only the periodic saves
    Group(args, tmp_path / "l2").wait()
    resumed = json.loads((run / "summary.json").read_text())["resumed_from_step"]
    assert resumed == saved[-1] >= 10, (resumed, saved)  # the newest save before the signal
    for key in ("loss", "eval_loss"):
        a, b = series(full, key), series(run, key)
        assert sorted(a) == sorted(b)
        np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-6)


@pytest.mark.slow
def test_processes_that_disagree_fail_in_one_line(data_dir, tok, tmp_path):
    """Different configs, or a mesh whose batch axes do not span the processes: every
    process stops with the same one-line error instead of hanging in a collective."""
    out = tmp_path / "r"
    args = main_args(CONFIG, out, settings(data_dir, tok, out))
    group = Group(args, tmp_path / "l0", extra={1: ["--set", "seed=1"]})
    for o in group.wait(timeout=120, code=2):
        assert "error: processes disagree on the config: process 1's differs from process 0's " \
            "(seed: 0 -> 1)" in o, o[-2000:]  # fmt: skip
    tensor_only = {"mesh.fsdp": 1, "mesh.tensor": 8}
    args = main_args(CONFIG, out, settings(data_dir, tok, out, **tensor_only))
    for o in Group(args, tmp_path / "l1").wait(timeout=120, code=2):
        assert "error: config key 'mesh': data×fsdp = 1 is not a multiple of the 2 processes" in o


def pretrain_loader():
    from jaxllm.config import LoaderConfig

    return LoaderConfig(seq_len=32, batch_size=8)


@pytest.mark.slow
def test_host_only_stage_runs_on_process_0(data_dir, tmp_path):
    """`stage: tokenizer` needs no devices: process 0 trains and writes, process 1 waits
    for its summary; an error there stops both with its message."""
    out = tmp_path / "tok"
    sets = {"output_dir": out, "progress": "false", "inputs.data_dir": data_dir,
            "tokenizer.vocab_size": 1300, "tokenizer.character_coverage": 0.98}  # fmt: skip
    group = Group(main_args("configs/tiny_tokenizer.yaml", out, sets), tmp_path / "l0")
    outs = group.wait(timeout=120)
    heads = [json.loads(o.split("done:")[1].splitlines()[1]) for o in outs]
    for head in heads:
        head.pop("seconds")  # each process's own
    assert heads[0] == heads[1]  # process 0's summary on both
    assert {"tokenizer.model", "summary.json"} <= run_files(group.writes(0))
    assert run_files(group.writes(1)) == set()
    sets.update({"output_dir": tmp_path / "bad", "tokenizer.vocab_size": 500})
    bad = Group(main_args("configs/tiny_tokenizer.yaml", tmp_path / "bad", sets), tmp_path / "l1")
    first, second = (o.split("error: ")[1] for o in bad.wait(timeout=120, code=2))
    assert first == second and first.startswith("sentencepiece could not train")


def test_partial_distributed_environment_is_refused(monkeypatch):
    from jaxllm.errors import ConfigError
    from jaxllm.sharding.multihost import initialize

    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    assert initialize(False) is False  # nothing set: one process, nothing joined
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES is set but JAX_COORDINATOR_ADDRESS"):
        initialize(False)
