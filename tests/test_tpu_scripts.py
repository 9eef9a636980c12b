"""tpu/*.sh: shellcheck-clean, and the exact gcloud commands their --dry-run prints; a slow
test runs startup.sh against this checkout and imports jaxllm from the venv it built."""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "tpu").glob("*.sh")) + [ROOT / "bench" / "gpu_suite.sh"]
SHELLCHECK = shutil.which("shellcheck") or shutil.which(
    "shellcheck", path=str(Path(os.sys.executable).parent)
)


def dry(script: str, *args: str) -> list[str]:
    out = subprocess.run(
        ["bash", str(ROOT / "tpu" / script), *args, "--dry-run"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    return [shlex.split(line) for line in out.stdout.strip().splitlines()]


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck is installed by the dev extra")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_shellcheck_clean(script):
    subprocess.run([SHELLCHECK, str(script)], check=True)


def test_create_dry_run_prints_the_gcloud_command():
    (cmd,) = dry("create.sh", "--name", "lm", "--zone", "us-central2-b", "--type", "v5litepod-8",
                 "--spot", "--repo", "https://example.org/j.git", "--branch", "dev",
                 "--runs", "gs://b/runs", "--project", "p1")  # fmt: skip
    assert cmd == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "lm", "--zone=us-central2-b",
        "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite",
        f"--metadata-from-file=startup-script={ROOT / 'tpu' / 'startup.sh'}",
        "--metadata=jaxllm-repo=https://example.org/j.git,jaxllm-branch=dev,jaxllm-runs=gs://b/runs",
        "--project=p1", "--spot",
    ]  # fmt: skip


def test_create_refuses_an_unknown_type_without_version():
    r = subprocess.run(["bash", str(ROOT / "tpu/create.sh"), "--name", "a", "--zone", "z",
                        "--type", "v9-8", "--repo", "r", "--dry-run"], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "no default runtime for 'v9-8'" in r.stderr


def test_run_dry_run_runs_the_config_on_every_worker_with_distributed():
    (cmd,) = dry("run.sh", "--name", "lm", "--zone", "z", "--config", "configs/gpt2_124m.yaml",
                  "--set", "train.steps=10", "--runs", "gs://b/runs")  # fmt: skip
    assert cmd[:8] == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        "lm",
        "--zone=z",
        "--worker=all",
    ]
    remote = cmd[8].removeprefix("--command=")
    main, tee = remote.split(" 2>&1 | tee -a ")
    assert main.startswith("cd /opt/jaxllm && mkdir -p logs && .venv/bin/python -m jaxllm.main ")
    argv = shlex.split(main.split("jaxllm.main ", 1)[1])
    assert argv == ["--config", "configs/gpt2_124m.yaml", "--set", "distributed=true",
                    "--set", "output_dir=gs://b/runs/gpt2_124m",
                    "--set", "compile_cache=gs://b/runs/xla-cache", "--set", "train.steps=10"]  # fmt: skip
    assert tee.startswith("logs/gpt2_124m.worker$(cat /tmp/jaxllm-worker")


def test_startup_dry_run_clones_and_installs():
    cmds = dry("startup.sh", "--repo", "https://example.org/j.git", "--home", "/tmp/j", "--no-tpu")
    assert cmds[0] == [
        "git",
        "clone",
        "--quiet",
        "--branch",
        "main",
        "https://example.org/j.git",
        "/tmp/j",
    ]
    assert ["/tmp/j/.venv/bin/pip", "install", "-q", "jax"] in cmds
    assert ["/tmp/j/.venv/bin/pip", "install", "-q", "-e", "/tmp/j"] in cmds


@pytest.mark.slow
def test_startup_builds_a_working_venv_from_a_local_checkout(tmp_path):
    branch = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--abbrev-ref", "HEAD"],
                            capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    home = tmp_path / "jaxllm"
    args = ["bash", str(ROOT / "tpu/startup.sh"), "--repo", str(ROOT), "--branch", branch,
            "--home", str(home), "--no-tpu"]  # fmt: skip
    subprocess.run(args, check=True, timeout=1800)
    subprocess.run(args, check=True, timeout=600)  # idempotent: a second boot updates in place
    out = subprocess.run([str(home / ".venv/bin/python"), "-c", "import jaxllm.main, jax; print(jax.__version__)"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.strip()
