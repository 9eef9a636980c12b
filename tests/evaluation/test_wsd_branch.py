"""WSD cooldowns branched off a longer run (`trainers/wsd_branch.py`): the branch point is
where the two schedules part, and a branch seeded from the trunk's checkpoint ends exactly
where the same run trained from scratch ends."""

import json

from jaxllm.config import load_config, replace
from jaxllm.trainers import run_stage
from jaxllm.trainers.scaling import run_config
from jaxllm.trainers.wsd_branch import branch_step, seed_branch
from tests.sft.conftest import ROOT


def sweep(tmp_path, data, tok, **scaling):
    """tiny_scaling with a small base (512 tokens per step) and the given scaling keys."""
    sets = {"output_dir": tmp_path, "progress": "false", "inputs.data_dir": data,
            "inputs.tokenizer": tok, "scaling.aspect": 16, "scaling.head_dim": 16,
            **{f"scaling.{k}": v for k, v in scaling.items()}}  # fmt: skip
    cfg = load_config(ROOT / "configs/tiny_scaling.yaml", [f"{k}={v}" for k, v in sets.items()])
    base = load_config(ROOT / "configs/tiny_pretrain.yaml")
    base = replace(base, loader=replace(base.loader, seq_len=64, batch_size=8))
    return cfg, base


def test_branch_step_is_where_the_schedules_part(tmp_path):
    # 8 and 16 steps, warmup int(0.25 * 8) = 2, cooldowns of round(0.5 * 8) = 4 and 8 steps:
    # the 8-step run's lr leaves the plateau at count 8 - 4 + 1 = 5 (at count 4, t = 0)
    cfg, base = sweep(tmp_path, "d", "t.model", schedule="wsd", decay_fraction=0.5,
                      warmup=0.25, tokens="[4096, 8192]")  # fmt: skip
    trunk, branch = (run_config(cfg, base, tmp_path, 1, t) for t in (8192, 4096))
    assert (trunk.train.steps, branch.train.steps) == (16, 8)
    assert trunk.train.optim.warmup_steps == branch.train.optim.warmup_steps == 2
    assert branch_step(trunk, branch) == 5
    # cosine runs share only the warmup and its peak (count 2): 3 steps
    cos, _ = sweep(tmp_path, "d", "t.model", warmup=0.25, tokens="[4096, 8192]")
    c_trunk, c_branch = (run_config(cos, base, tmp_path, 1, t) for t in (8192, 4096))
    assert c_trunk.train.optim.warmup_steps == 4 and c_branch.train.optim.warmup_steps == 2
    assert branch_step(c_trunk, c_branch) == 0  # different warmups part at once
    same_warmup = replace(c_trunk, train=replace(c_trunk.train, optim=c_branch.train.optim))
    assert branch_step(same_warmup, c_branch) == 3
    # anything but the steps differing (here the size): nothing shared
    assert branch_step(run_config(cfg, base, tmp_path, 2, 8192), branch) == 0
    assert branch_step(branch, trunk) == 0  # the trunk must be the longer run


def test_seeded_branch_ends_as_the_run_from_scratch(tmp_path, tok, tiny_ckpt):
    data = tiny_ckpt.parent.parent / "data"
    cfg, base = sweep(tmp_path / "sweep", data, tok.path, schedule="wsd", decay_fraction=0.5,
                      warmup=0.25, tokens="[4096, 8192]", eval_batches=2)  # fmt: skip
    branch = run_config(cfg, base, tmp_path / "sweep", 1, 4096)
    trunk = run_config(cfg, base, tmp_path / "sweep", 1, 8192, checkpoint_at=(5,))
    b = branch_step(trunk, branch)
    assert b == 5
    run_stage(trunk)
    assert seed_branch(trunk, branch, b)
    seeded_at = (branch.run_dir / "config.yaml").stat().st_mtime_ns
    assert seed_branch(trunk, branch, b)  # started already: left alone
    assert (branch.run_dir / "config.yaml").stat().st_mtime_ns == seeded_at
    seeded = run_stage(branch)
    scratch = run_stage(replace(branch, output_dir=str(tmp_path / "scratch")))
    assert seeded["resumed_from_step"] == 5 and scratch["resumed_from_step"] == 0
    for key in ("final_train_loss", "val_loss", "tokens_seen"):
        assert seeded[key] == scratch[key], key  # bit for bit
    rows = [_rows(r / "metrics.jsonl") for r in (branch.run_dir, tmp_path / "scratch")]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]]  # the whole curve
    for a, c in zip(*rows):
        assert a.get("loss") == c.get("loss") and a.get("lr") == c.get("lr"), a["step"]
    # no checkpoint at that step (a budget added after the trunk finished): from scratch
    other = replace(branch, output_dir=str(tmp_path / "other"))
    assert not seed_branch(trunk, other, 4) and not other.run_dir.exists()


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_seeding_into_a_bucket_starts_an_interrupted_copy_again(bucket):
    """The trunk and the branch in `gs://bucket` (etils.epath): the checkpoint's tree, the
    metrics, then the config; a branch left without its config by a killed copy is copied
    again, one with a config is left alone."""
    from jaxllm.config import from_dict

    trunk = from_dict({"stage": "pretrain", "output_dir": "gs://bucket/trunk"})
    branch = from_dict({"stage": "pretrain", "name": "b", "output_dir": "gs://bucket/branch"})
    step = bucket / "trunk/checkpoints/5"
    (step / "state/d").mkdir(parents=True)
    (step / "state/d/shard").write_bytes(b"\x00\x01")
    (step / "meta.json").write_text("{}")
    (bucket / "trunk/metrics.jsonl").write_text('{"step": 5}\n{"step": 6}\n')
    (bucket / "branch/checkpoints/5").mkdir(parents=True)  # a killed copy's remains
    (bucket / "branch/checkpoints/5/torn").write_text("")
    assert seed_branch(trunk, branch, 5)
    got = sorted(str(p.relative_to(bucket / "branch")) for p in (bucket / "branch").rglob("*"))
    assert got == ["checkpoints", "checkpoints/5", "checkpoints/5/meta.json",
                   "checkpoints/5/state", "checkpoints/5/state/d", "checkpoints/5/state/d/shard",
                   "config.yaml", "metrics.jsonl"]  # fmt: skip
    assert (bucket / "branch/checkpoints/5/state/d/shard").read_bytes() == b"\x00\x01"
    assert (bucket / "branch/metrics.jsonl").read_text().count("step") == 2
    assert "name: b" in (bucket / "branch/config.yaml").read_text()
    seeded_at = (bucket / "branch/config.yaml").stat().st_mtime_ns
    assert seed_branch(trunk, branch, 5)  # started already: left alone
    assert (bucket / "branch/config.yaml").stat().st_mtime_ns == seeded_at
