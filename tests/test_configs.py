"""Every shipped config loads and validates (DESIGN: one test loads every file in configs/)."""

from pathlib import Path

import pytest

from jaxllm.config import from_dict, load_config, to_dict
from jaxllm.trainers import STAGES, check_stage

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"tiny.yaml", "tiny_data.yaml", "tiny_tokenizer.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    cfg = load_config(path)
    check_stage(cfg.stage)
    for sub in cfg.pipeline:
        assert sub.stage in STAGES
    assert from_dict(to_dict(cfg)) == cfg  # the resolved config reloads to the same tree
