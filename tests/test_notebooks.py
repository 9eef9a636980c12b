"""Every notebook in notebooks/ runs top to bottom on CPU with tiny settings (a kernel per
notebook, through nbclient), and is what scripts/make_notebooks.py writes."""

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from jaxllm.config import load_config
from jaxllm.errors import JaxllmError
from jaxllm.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# The alignment notebook trains eight stages (about 90 s of CPU even with tiny settings) and
# bring_your_own_model imports, fine-tunes and exports (24 s; each step has its own fast test
# in tests/interop and tests/sft); quickstart runs the demo's first stages (40 s: the same
# stages as tests/test_pipeline_e2e.py, its `run` helper tested fast below). All three run in
# `make test-all`; the fast suite keeps under its 10-minute budget.
SLOW = {"alignment", "bring_your_own_model", "quickstart"}
CASES = [
    pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if p.stem in SLOW else [])
    for p in NOTEBOOKS
]


def test_notebooks_are_what_the_generator_writes(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "scripts/make_notebooks.py"), str(tmp_path)], check=True
    )
    made = {p.name: p.read_bytes() for p in sorted(tmp_path.glob("*.ipynb"))}
    assert made == {p.name: p.read_bytes() for p in NOTEBOOKS}, "run scripts/make_notebooks.py"
    assert set(made) == {"quickstart.ipynb", "bring_your_own_model.ipynb", "alignment.ipynb"}


@pytest.mark.parametrize("path", CASES)
def test_notebook_runs_on_cpu(path, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLLM_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("JAXLLM_NOTEBOOK_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device: the tiny configs' batches fit any
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.output_type == "error"
    ]
    assert not errors
    assert any((tmp_path / "runs" / path.stem).glob("*/summary.json"))  # its own folder


def setup_cell(path: Path, runs: Path, monkeypatch) -> dict:
    """The namespace of `path`'s setup cell, executed here (not on Colab: nothing installed)."""
    monkeypatch.setenv("JAXLLM_NOTEBOOK_DIR", str(runs))
    monkeypatch.delenv("JAXLLM_NOTEBOOK_SMOKE", raising=False)
    cell = nbformat.read(path, as_version=4).cells[1]
    assert "def run(" in cell.source
    ns: dict = {"__name__": "notebook"}
    exec(compile(cell.source, str(path), "exec"), ns)
    return ns


def test_each_notebook_runs_in_its_own_folder(tmp_path, monkeypatch):
    works = [setup_cell(p, tmp_path, monkeypatch)["WORK"] for p in NOTEBOOKS]
    assert works == [tmp_path / p.stem for p in NOTEBOOKS]


def test_a_rerun_reuses_finished_stages_and_reruns_changed_ones(tmp_path, monkeypatch):
    """The run directory contract for real (RunDir), the stages' work left out: "Run all"
    twice reuses every stage; a changed stage runs again, and so does a stage that reads it."""
    ns = setup_cell(ROOT / "notebooks/quickstart.ipynb", tmp_path, monkeypatch)
    calls = []

    def fake_main(argv):  # jaxllm.main.main without the stage's work: RunDir.open, finish
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        try:
            cfg = load_config(argv[1], sets)
            RunDir.open(cfg).finish({"stage": cfg.stage, "seed": cfg.seed})
        except JaxllmError as e:
            calls.append(("error", str(e)))
            return 2
        calls.append((cfg.run_dir.name, cfg.overwrite))
        return 0

    ns["main"] = fake_main
    run, work = ns["run"], tmp_path / "quickstart"
    data_dir = f"inputs.data_dir={work / 'data'}"
    for _ in range(2):  # "Run all" twice
        assert run("tiny_data.yaml", "data")["stage"] == "data"
        assert run("tiny_tokenizer.yaml", "tokenizer", data_dir)["stage"] == "tokenizer"
    assert calls == [("data", False), ("tokenizer", False)]
    assert run("tiny_data.yaml", "data", "seed=3")["seed"] == 3  # changed: runs over the old
    assert run("tiny_tokenizer.yaml", "tokenizer", data_dir)["seed"] == 0  # its input changed
    assert calls[2:] == [("data", True), ("tokenizer", True)]
    (work / "tokenizer" / "summary.json").unlink()  # interrupted: same config resumes
    run("tiny_tokenizer.yaml", "tokenizer", data_dir)
    assert calls[4:] == [("tokenizer", False)]


@pytest.mark.parametrize(
    "env, devices, want",
    [
        ({}, [], ""),  # CPU runtime
        ({}, ["nvidia0", "nvidiactl"], "cuda12"),  # GPU runtime
        ({}, ["vfio/vfio"], ""),  # the vfio control node alone is no TPU
        ({"COLAB_TPU_ADDR": "10.0.0.2:8470"}, [], "tpu"),  # TPU v2 (a TPU node)
        ({}, ["accel0", "accel1"], "tpu"),  # TPU v4 VM
        ({"TPU_ACCELERATOR_TYPE": "v5litepod-1"}, ["vfio/vfio", "vfio/0"], "tpu"),  # v5e
        ({}, ["vfio/vfio", "vfio/0", "vfio/1"], "tpu"),  # v6e without the variable
        ({"TPU_ACCELERATOR_TYPE": "v6e-1"}, [], "tpu"),
    ],
)
def test_colab_accelerator(env, devices, want, tmp_path, monkeypatch):
    ns = setup_cell(ROOT / "notebooks/quickstart.ipynb", tmp_path / "runs", monkeypatch)
    for d in devices:
        (tmp_path / "dev" / d).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "dev" / d).touch()
    assert ns["colab_accelerator"](env, tmp_path / "dev") == want
