"""DESIGN.md's import direction, read from the source: `main` → `trainers` → (`training`,
`data`, `generation`, `interop`) → (`models`, `tokenizer`, `sharding`, `config`). The middle
packages do not import each other, and the lower layer imports no package above it.
`serving` (the HTTP app) sits beside `trainers`: it uses the middle layer, and nothing below
imports it."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "jaxllm"
MIDDLE = ("training", "data", "generation", "interop")
LOWER = ("models", "tokenizer", "sharding", "config")
ABOVE = {**{p: {"main", "trainers", "serving", *MIDDLE} - {p} for p in MIDDLE},
         **{p: {"main", "trainers", "serving", *MIDDLE} for p in LOWER}}  # fmt: skip


def imported_packages(path: Path) -> set[str]:
    """The `jaxllm.<package>` names a module imports (at any depth, lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found |= {n.split(".")[1] for n in names if n.startswith("jaxllm.")}
    return found


@pytest.mark.parametrize("package", MIDDLE + LOWER)
def test_no_import_against_the_direction(package):
    bad = {
        str(f.relative_to(ROOT)): sorted(imported_packages(f) & ABOVE[package])
        for f in sorted((ROOT / package).rglob("*.py"))
    }
    assert not {k: v for k, v in bad.items() if v}


def test_stage_modules_do_not_import_each_other():
    """What several stages use lives in a shared module (`lm`, `pairs`, `reward_model`,
    `rollout`, `rl_loop`), never in another stage's module; only `pipeline` runs stages."""
    from jaxllm.trainers import STAGES

    stages = {m.rsplit(".", 1)[1] for m in STAGES.values()} - {"pipeline"}
    bad = {}
    for name in sorted(stages):
        tree = ast.parse((ROOT / "trainers" / f"{name}.py").read_text())
        mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        used = {m.rsplit(".", 1)[1] for m in mods if m.startswith("jaxllm.trainers.")}
        bad[name] = sorted(used & stages - {name})
    assert not {k: v for k, v in bad.items() if v}
