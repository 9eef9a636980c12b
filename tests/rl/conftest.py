"""Fixtures for the PPO / GRPO tests: the SFT tests' tokenizer and a tiny pretrained
checkpoint (d_model 32, one layer), made once per session."""

from pathlib import Path

from ..sft.conftest import ROOT


def rl_config(stage: str, ckpt: Path, out: Path, **section):
    """configs/tiny_<stage>.yaml shrunk to 2 iterations of the tiny model."""
    from jaxllm.config import from_dict, read_yaml

    raw = read_yaml(ROOT / f"configs/tiny_{stage}.yaml")
    raw.update(name=stage, output_dir=str(out), progress=False)
    raw["inputs"]["checkpoint"] = str(ckpt)
    raw[stage] = {**raw[stage], **section}
    return from_dict(raw)
