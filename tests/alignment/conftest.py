"""Fixtures for the reward / DPO stage tests: the SFT tests' tokenizer and a tiny pretrained
checkpoint (d_model 32, one layer), made once per session."""

from pathlib import Path

from ..sft.conftest import ROOT
from ..sft.test_sft_stage import TINY, pretrain  # noqa: F401


def stage_config(stage: str, ckpt: Path, out: Path, **sections):
    """configs/tiny_<stage>.yaml shrunk to a few steps of the tiny model."""
    from jaxllm.config import from_dict, read_yaml

    raw = read_yaml(ROOT / f"configs/tiny_{stage}.yaml")
    raw.update(name=stage, output_dir=str(out), progress=False)
    raw["inputs"]["checkpoint"] = str(ckpt)
    raw["loader"] = {"seq_len": 64, "batch_size": 8}
    raw["train"].update(steps=4, log_every=1, eval_every=2, checkpoint_every=2, eval_batches=0)
    for key, value in sections.items():
        old = raw.get(key, {})
        raw[key] = {**old, **value}
        for sub, inner in value.items():  # e.g. train.optim: merged one level deeper
            if isinstance(inner, dict):
                raw[key][sub] = {**old.get(sub, {}), **inner}
    return from_dict(raw)


def run_stage(module, cfg) -> dict:
    from jaxllm.rundir import RunDir

    run_dir = RunDir.open(cfg)
    return run_dir.finish(module.run(cfg, run_dir))


def rerun_after_step_2(module, cfg) -> dict:
    """A crash after step 2 of a 4-step run (its step-4 checkpoint and summary gone): the
    rerun's summary, which must say it resumed from step 2."""
    import shutil

    shutil.rmtree(cfg.run_dir / "checkpoints/4")
    (cfg.run_dir / "summary.json").unlink()
    again = run_stage(module, cfg)
    assert again["resumed_from_step"] == 2
    return again
