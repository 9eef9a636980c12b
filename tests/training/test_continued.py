"""Continued pretraining (`stage: pretrain` with `inputs.checkpoint`): the first step's loss is
the checkpoint's loss on the same batch, the shape must match, Adam's moments come along on
request."""

import json

import jax
import numpy as np
import optax
import pytest

from jaxllm.config import from_dict, read_yaml
from jaxllm.data.pipeline import make_lm_dataset
from jaxllm.data.sources import cleaned_shards
from jaxllm.main import main
from jaxllm.sharding import make_mesh
from jaxllm.trainers.checkpoint_model import load_checkpoint_model
from jaxllm.trainers.continued import load_into
from jaxllm.trainers.lm import lm_loss, model_fn
from jaxllm.training.checkpoint import Checkpointer
from jaxllm.training.optim import make_optimizer
from jaxllm.training.state import create_train_state, to_global
from tests.sft.conftest import ROOT
from tests.sft.test_sft_stage import TINY


def args(tiny_ckpt, out, *extra):
    sets = {
        "output_dir": out, "progress": "false", "inputs.checkpoint": tiny_ckpt, "inputs.tokenizer": "\"\"",
        "inputs.data_dir": tiny_ckpt.parent.parent / "data", "loader.seq_len": 64,
        "loader.batch_size": 8, "train.steps": 2, "train.log_every": 1, "train.eval_batches": 1,
        **{f"model.{k}": v for k, v in TINY.items()}, **dict(e.split("=", 1) for e in extra),
    }  # fmt: skip
    return ["--config", str(ROOT / "configs/tiny_pretrain.yaml"),
            *[x for k, v in sets.items() for x in ("--set", f"{k}={v}")]]  # fmt: skip


def test_first_step_loss_is_the_checkpoints_loss_on_that_batch(tmp_path, tok, tiny_ckpt):
    assert main(args(tiny_ckpt, tmp_path / "cont")) == 0
    rows = [json.loads(x) for x in (tmp_path / "cont/metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r["step"] == 1)
    cfg = from_dict(read_yaml(tmp_path / "cont/config.yaml"))
    batch = next(iter(make_lm_dataset(cleaned_shards(cfg.inputs.data_dir, "train"), tok,
                                      cfg.loader, seed=cfg.seed)))  # fmt: skip
    mesh = make_mesh(cfg.mesh)
    graphdef, state, _, _ = load_checkpoint_model(tiny_ckpt, mesh)
    from flax import nnx

    loss, aux = lm_loss()(nnx.merge(graphdef, state), to_global(batch, mesh), None)
    assert first["loss"] == pytest.approx(float(loss / aux["weight"]), abs=2e-5)
    summary = json.loads((tmp_path / "cont/summary.json").read_text())
    assert summary["started_from"] == str(tiny_ckpt)


def test_a_model_of_another_shape_is_refused(tmp_path, tiny_ckpt, capsys):
    assert main(args(tiny_ckpt, tmp_path / "bad", "model.d_model=64")) == 2
    assert (
        "config key 'model.d_model': 64 here but 32 in inputs.checkpoint" in capsys.readouterr().err
    )


def test_optimizer_moments_from_the_checkpoint(tiny_ckpt):
    cfg = from_dict({"stage": "pretrain", "inputs": {"checkpoint": str(tiny_ckpt)},
                     "model": {**TINY, "vocab_size": 0}, "train": {"init_optimizer": "checkpoint"}})  # fmt: skip
    saved = Checkpointer(tiny_ckpt, async_save=False)
    meta = saved.read_meta(saved.latest_step())
    m = from_dict({"stage": "generate", "model": meta["model"]}).model
    mesh = make_mesh(cfg.mesh)
    tx = make_optimizer(cfg.train.optim, cfg.train.steps)
    _, state, shardings = create_train_state(model_fn(m, 1), tx, mesh, cfg.mesh.rules, 1)
    loaded = load_into(state, shardings, cfg, mesh)
    want, _ = saved.restore(saved.latest_step(), state)
    sched = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    got_sched, got = partition(loaded.opt_state, sched)
    want_sched, want = partition(want.opt_state, sched)
    for a, b in zip(got, want):  # the moments and Adam's count (its bias correction)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (
        [int(c) for c in want_sched]
        == [saved.latest_step()]
        == [int(x) for x in got if x.ndim == 0]
    )
    assert [int(c) for c in got_sched] == [0]  # the new run's lr schedule starts at its beginning
    assert int(loaded.step) == 0
    fresh = load_into(state, shardings, from_dict({**cfg_dict(cfg), "train": {}}), mesh)
    assert all(not np.asarray(x).any() for x in jax.tree.leaves(fresh.opt_state))  # zeros


def partition(opt_state, is_sched):
    """(the schedules' counts, every other leaf) of an optax state."""
    sched = [x.count for x in jax.tree.leaves(opt_state, is_leaf=is_sched) if is_sched(x)]
    rest = jax.tree.leaves(jax.tree.map(lambda x: None if is_sched(x) else x, opt_state,
                                        is_leaf=is_sched))  # fmt: skip
    return sched, rest


def cfg_dict(cfg):
    from jaxllm.config import to_dict

    return to_dict(cfg)


def test_a_pipeline_never_hands_a_checkpoint_to_pretrain():
    from jaxllm.trainers.pipeline import fill_inputs

    out = {"checkpoint": "runs/x/checkpoints", "data_dir": "runs/d"}
    pre = fill_inputs(from_dict({"stage": "pretrain"}), out)
    assert pre.inputs.checkpoint == "" and pre.inputs.data_dir == "runs/d"
    assert fill_inputs(from_dict({"stage": "sft"}), out).inputs.checkpoint == "runs/x/checkpoints"
