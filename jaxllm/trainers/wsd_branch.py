"""Cooldowns branched off one warmup-stable-decay run (Hagele et al. 2024, "Scaling Laws and
Compute-Optimal Training Beyond Fixed Training Durations").

Two pretrain runs that differ only in `train.steps` under `schedule: wsd` (with the same
warmup) take the same learning rate until the shorter one starts to cool down: same seed,
same data order, same updates. So the longer run (the *trunk*), saving a checkpoint at that
step (`train.checkpoint_at`), gives the shorter run (the *branch*) its first steps: the
branch's run directory is seeded with that checkpoint and its metrics so far, and the
ordinary resume trains only the cooldown. The branch ends bit-identical to one trained from
scratch (tested), at a fraction of the compute.

`branch_step` finds the step from the two schedules themselves rather than from a formula,
so any schedule pair is handled: where they differ from the first step the branch trains
from scratch.
"""

from __future__ import annotations

import shutil

import jax.numpy as jnp
import numpy as np

from jaxllm.config import Config, dump_yaml, is_remote, replace, storage_path
from jaxllm.rundir import atomic_write_text, primary_decides
from jaxllm.trainers.lm import checkpoint_dir
from jaxllm.training.optim import lr_schedule


def branch_step(trunk: Config, branch: Config) -> int:
    """The number of first steps `branch` shares with `trunk`: those whose learning rates
    (the optimizer's count 0 .. b-1) are equal, capped at the branch's last step - 1 (it
    trains at least one step of its own); 0 when the configs differ in anything else that
    the steps would see."""
    if not _same_but_schedule(trunk, branch):
        return 0
    n = branch.train.steps
    count = jnp.arange(n)
    mine = np.asarray(lr_schedule(branch.train.optim, n)(count))
    theirs = np.asarray(lr_schedule(trunk.train.optim, trunk.train.steps)(count))
    differ = np.flatnonzero(mine != theirs)
    shared = int(differ[0]) if differ.size else n
    return min(shared, n - 1)


def _same_but_schedule(trunk: Config, branch: Config) -> bool:
    """Whether the runs see the same model, data, mesh and updates (all but step counts)."""

    def core(c: Config):
        t = c.train
        return (c.model, c.loader, c.seed, c.inputs, c.mesh, replace(
            t, steps=0, log_every=1, eval_every=0, checkpoint_every=0, checkpoint_at=(),
            keep_checkpoints=1, eval_batches=0))  # fmt: skip

    return trunk.train.steps > branch.train.steps and core(trunk) == core(branch)


def seed_branch(trunk: Config, branch: Config, step: int) -> bool:
    """Starts `branch`'s run directory from `trunk`'s checkpoint at `step` (process 0 copies;
    every process returns once it has): the checkpoint, the metrics up to it (a resume drops
    later rows), and last the config, so an interrupted copy is started again. A branch
    directory that holds a config already (started, or finished) is left alone. False when
    the trunk has no checkpoint at `step` (a preemption's extra save rotated it out, or it
    was removed): the branch then trains from its first step, and says so."""
    return primary_decides(_seed, trunk, branch, step)


def _seed(trunk: Config, branch: Config, step: int) -> bool:
    dst = storage_path(branch.run_dir)
    if (dst / "config.yaml").exists():
        return True
    src = checkpoint_dir(trunk.run_dir) / str(step)
    if not src.exists():
        print(
            f"{branch.name}: {trunk.run_dir} has no checkpoint at step {step}, where this "
            "budget's cooldown begins; training it from scratch (the same run, more steps)"
        )
        return False
    if dst.exists():  # an interrupted copy
        dst.rmtree() if is_remote(dst) else shutil.rmtree(dst)
    _copy_tree(src, checkpoint_dir(dst) / str(step))
    metrics = storage_path(trunk.run_dir) / "metrics.jsonl"
    if metrics.exists():
        atomic_write_text(dst / "metrics.jsonl", metrics.read_text())
    atomic_write_text(dst / "config.yaml", dump_yaml(branch))
    return True


def _copy_tree(src, dst) -> None:
    if not is_remote(dst):
        shutil.copytree(src, dst)
        return
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_dir():
            _copy_tree(p, dst / p.name)
        else:
            p.copy(dst / p.name)
