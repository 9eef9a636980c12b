"""Every notebook in notebooks/ runs top to bottom on CPU with tiny settings (a kernel per
notebook, through nbclient), and is what scripts/make_notebooks.py writes."""

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# The alignment notebook trains eight stages (about 90 s of CPU even with tiny settings) and
# bring_your_own_model imports, fine-tunes and exports (24 s; each step has its own fast test
# in tests/interop and tests/sft): they run in `make test-all`; quickstart runs in `make test`.
SLOW = {"alignment", "bring_your_own_model"}
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
    assert (tmp_path / "runs").is_dir() and any((tmp_path / "runs").glob("*/summary.json"))
