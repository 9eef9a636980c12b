"""Adapters, prefix tuning and prompt tuning through `stage: sft`: only the method's
variables train and are saved (a reparameterisation MLP only until the last step), the
base stays bit-identical, the checkpoint restored onto its base gives the trained greedy
answers, and export / a later training stage refuse what cannot be merged; an early stop
and the best checkpoint hold folded prefixes too."""

import json
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import replace
from jaxllm.config.peft import PeftConfig
from jaxllm.data.sft import SFTRecords
from jaxllm.errors import ConfigError
from jaxllm.models.peft import PEFT_METHODS, fold_reparameterisations
from jaxllm.sharding import make_mesh
from jaxllm.tokenizer.chat import ChatTemplate
from jaxllm.trainers import data_file
from jaxllm.trainers.continued import checkpoint_model_config
from jaxllm.trainers.hf_export import export_checkpoint
from jaxllm.trainers.lm import init_from_checkpoint, load_checkpoint_model
from jaxllm.trainers.sft import make_answer_scorer
from jaxllm.training.checkpoint import Checkpointer, _flat
from jaxllm.training.optim import make_optimizer

from .test_sft_stage import run_sft, sft_config

D, F, P, H = 32, 64, 4, 16  # the tiny model: d_model 32, 1 layer, 2 heads, d_ff 64
ADAPTERS = {f"blocks.0.{s}_adapter.{w}" for s in ("attn", "mlp") for w in ("up", "down")}
ADAPTERS |= {f"{w}_bias" for w in ADAPTERS}
MLP = {"embedding", "w1", "b1", "w2", "b2"}
CASES = {  # method config, trainable parameters by the published formula, saved at steps 2, 4
    "adapter": (PeftConfig("adapter", adapter_dim=8), 2 * (2 * D * 8 + D + 8), ADAPTERS, None),
    "prefix": (
        PeftConfig("prefix", num_virtual_tokens=P, prefix_projection=True, prefix_hidden=H),
        P * D + D * H + H + H * 2 * D + 2 * D,  # the MLP while training (1 layer: L·2·d)
        {f"prefix.{w}" for w in MLP},
        {"prefix.kv"},
    ),
    "prompt": (
        PeftConfig("prompt", num_virtual_tokens=P, prompt_encoder="mlp", prompt_hidden=H),
        P * D + 2 * D * H + H + D,
        {f"prompt.{w}" for w in MLP},
        {"prompt.embedding"},
    ),
}


def saved(ckpt_dir, step: int) -> tuple[set[str], set[str]]:
    """(parameter paths, other top-level entries) of a checkpoint's saved state."""
    ckpt = Checkpointer(ckpt_dir, async_save=False)
    keys = [k for k, _ in _flat(ckpt.manager.item_metadata(step)["state"])]
    ckpt.close()
    params = {k.removeprefix("params.") for k in keys if k.startswith("params.")}
    return params, {k.split(".")[0] for k in keys} - {"params"}


def greedy_answers(cfg, graphdef, state, tok) -> list[str]:
    """The stage's own held-out greedy answers (`make_answer_scorer`) for these weights."""
    s = cfg.sft
    records = SFTRecords([data_file(s.val_file, "sft.val_file")], s.format)
    score = make_answer_scorer(graphdef, ChatTemplate(tok), records, s, cfg.seed)
    samples = score(SimpleNamespace(params=state, frozen=nnx.State({})))["samples"]
    return [x["answer"] for x in samples]


@pytest.mark.parametrize(  # prefix (MLP, fold, refusals) in the fast suite; each ~15 s CPU
    "name",
    [pytest.param("adapter", marks=pytest.mark.slow), "prefix",
     pytest.param("prompt", marks=pytest.mark.slow)],
)  # fmt: skip
def test_peft_sft_trains_and_saves_only_its_variables(tmp_path, tok, tiny_ckpt, name):
    peft, want_params, at_2, at_4 = CASES[name]
    cfg = sft_config(tiny_ckpt, tmp_path / name)
    cfg = replace(cfg, peft=peft)
    cfg = replace(cfg, train=replace(cfg.train, optim=replace(cfg.train.optim, lr=1e-2)))
    summary = run_sft(cfg)
    assert summary["trainable_params"] == want_params
    assert summary["val_loss_after"] < summary["val_loss_before"]

    ckpts = tmp_path / name / "checkpoints"
    assert saved(ckpts, 2) == (at_2, {"opt_state", "rng", "step"})  # no base weight
    if at_4 is None:
        assert saved(ckpts, 4) == saved(ckpts, 2)
    else:  # the last step holds the values the MLP folds into (step 2 it, to resume)
        assert saved(ckpts, 4) == (at_4, {"step"})

    mesh = make_mesh(cfg.mesh)
    _, base, _, _ = load_checkpoint_model(tiny_ckpt, mesh)
    graphdef, adapted, _, meta = load_checkpoint_model(ckpts, mesh)
    assert meta["base_checkpoint"] == str(tiny_ckpt.absolute())
    variable = PEFT_METHODS[peft.method].variable
    rest = nnx.filter_state(adapted, nnx.Not(variable))
    for a, b in zip(jax.tree.leaves(rest), jax.tree.leaves(base), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # base bit-identical
    assert greedy_answers(cfg, graphdef, adapted, tok) == [
        x["answer"] for x in summary["samples_after"]
    ]

    if name == "prefix":  # neither a HF directory nor a later stage can take it
        with pytest.raises(ConfigError, match="cannot be merged"):
            export_checkpoint(ckpts, tmp_path / "hf")
        later = sft_config(ckpts, tmp_path / "later")
        with pytest.raises(ConfigError, match="cannot be merged"):
            init_from_checkpoint(later, make_optimizer(later.train.optim, 4), mesh)
        with pytest.raises(ConfigError, match="cannot be merged into plain weights to continue"):
            checkpoint_model_config(ckpts)  # nor continued pretraining

        # killed after the last save, before its summary: the rerun drops the folded step,
        # repeats steps 3-4 from step 2 and folds the same values again
        (tmp_path / name / "summary.json").unlink()
        again = run_sft(cfg)
        assert again["resumed_from_step"] == 2
        assert again["final_train_loss"] == summary["final_train_loss"]
        assert again["val_loss_after"] == summary["val_loss_after"]
        _, rerun, _, _ = load_checkpoint_model(ckpts, mesh)
        for a, b in zip(jax.tree.leaves(rerun), jax.tree.leaves(adapted), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_an_early_stop_and_the_best_checkpoint_hold_the_folded_prefixes(tmp_path, tiny_ckpt):
    """`train.early_stopping` + `keep_best` with a reparameterised method: the stop's
    checkpoint and `best/` hold plain prefixes, those the MLP of the best step gives."""
    cfg = sft_config(tiny_ckpt, tmp_path / "es")
    t = cfg.train
    es = replace(t.early_stopping, patience=1, min_delta=100.0)  # the 2nd evaluation stops
    t = replace(t, eval_every=1, checkpoint_every=1, keep_checkpoints=5, keep_best=True,
                early_stopping=es, optim=replace(t.optim, lr=1e-2))  # fmt: skip
    cfg = replace(cfg, peft=CASES["prefix"][0], train=t)
    summary = run_sft(cfg)
    assert summary["stopped_early_at"] == 2 and summary["best_step"] == 1
    # the figures after training are best/'s (step 1, folded), not the last weights' (step 2)
    rows = (tmp_path / "es/metrics.jsonl").read_text().splitlines()
    evals = {r["step"]: r["eval_loss"] for r in map(json.loads, rows) if "eval_loss" in r}
    assert abs(evals[1] - evals[2]) > 4e-4  # the summary rounds to 4 decimals
    assert summary["val_loss_after"] == pytest.approx(evals[1], abs=1.5e-4)
    ckpts, best = tmp_path / "es/checkpoints", tmp_path / "es/best"
    assert saved(ckpts, 1) == (CASES["prefix"][2], {"opt_state", "rng", "step"})
    assert saved(ckpts, 2) == saved(best, 1) == ({"prefix.kv"}, {"step"})
    mesh = make_mesh(cfg.mesh)
    graphdef, at_1, _, _ = load_checkpoint_model(ckpts, mesh, step=1)  # the MLP, unfolded
    model = nnx.merge(graphdef, at_1)
    assert fold_reparameterisations(model) == 1
    _, kept, _, _ = load_checkpoint_model(best, mesh)
    np.testing.assert_allclose(
        np.asarray(kept["prefix"]["kv"][...]),
        np.asarray(model.prefix.kv[...]),
        rtol=1e-6,
        atol=1e-6,
    )
    # killed after the stop's save, before its summary: the rerun repeats step 2 from step 1
    # and stops there again
    (tmp_path / "es/summary.json").unlink()
    again = run_sft(cfg)
    assert again["resumed_from_step"] == 1 and again["stopped_early_at"] == 2
    assert again["val_loss_after"] == summary["val_loss_after"]
    assert saved(ckpts, 2) == ({"prefix.kv"}, {"step"})
