"""LoRA through `stage: sft`: only adapters train and are saved, the base stays bit-identical,
an adapter-only checkpoint restores onto a fresh base, and `merge_lora` matches it."""

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import replace
from jaxllm.config.peft import PeftConfig
from jaxllm.errors import ConfigError
from jaxllm.models.lora import merge_lora
from jaxllm.sharding import make_mesh
from jaxllm.trainers.lm import load_checkpoint_model
from jaxllm.training.checkpoint import Checkpointer

from .test_sft_stage import run_sft, sft_config


def test_lora_sft_adapters_only(tmp_path, tok, tiny_ckpt):
    base_ckpt = tiny_ckpt
    cfg = sft_config(base_ckpt, tmp_path / "lora")
    cfg = replace(cfg, peft=PeftConfig("lora", rank=4, alpha=8.0))
    cfg = replace(cfg, train=replace(cfg.train, optim=replace(cfg.train.optim, lr=1e-2)))
    summary = run_sft(cfg)
    # d32, 1 layer, d_ff 64: q k v o = 4 * (32 + 32) * 4, up = (32 + 64) * 4, down = (64 + 32) * 4
    assert summary["trainable_params"] == 4 * 64 * 4 + 2 * 96 * 4
    assert summary["trainable_params"] < 0.1 * summary["total_params"]
    assert summary["val_loss_after"] < summary["val_loss_before"]

    mesh = make_mesh(cfg.mesh)
    g0, base, _, _ = load_checkpoint_model(base_ckpt, mesh)
    g1, adapted, _, meta = load_checkpoint_model(tmp_path / "lora/checkpoints", mesh)
    assert meta["base_checkpoint"] == str(base_ckpt.absolute())
    # the checkpoint holds adapters only (plus their optimizer state, step, rng)
    saved = Checkpointer(tmp_path / "lora/checkpoints", async_save=False)
    names = {k for k in str(saved.manager.item_metadata(4)["state"]).split("'") if "." not in k}
    assert "q_lora_a" in names and "embedding" not in names and "up" not in names
    # base weights bit-identical; adapters moved away from B = 0
    adapted_base = nnx.filter_state(adapted, nnx.Not(nnx.LoRAParam))
    for a, b in zip(jax.tree.leaves(adapted_base), jax.tree.leaves(base), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lora_b = [x for p, x in nnx.to_flat_state(adapted) if str(p[-1]).endswith("_lora_b")]
    assert lora_b and max(float(np.abs(np.asarray(x[...])).max()) for x in lora_b) > 0

    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, tok.vocab_size)
    model = nnx.merge(g1, adapted)
    logits = model(tokens)
    assert float(np.abs(logits - nnx.merge(g0, base)(tokens)).max()) > 1e-4
    merge_lora(model)
    np.testing.assert_allclose(model(tokens), logits, atol=1e-5, rtol=1e-5)

    # resume: the adapter checkpoint at step 2 restores and reproduces steps 3-4 exactly
    shutil.rmtree(tmp_path / "lora/checkpoints/4")
    (tmp_path / "lora/summary.json").unlink()
    again = run_sft(cfg)
    assert again["resumed_from_step"] == 2
    assert again["final_train_loss"] == summary["final_train_loss"]

    # the base replaced since by another model (an import redone with other chat tokens):
    # named in one line, not a shape error deep in the restore
    meta_file = tmp_path / "lora/checkpoints/4/meta/metadata"
    meta = json.loads(meta_file.read_text())
    vocab = meta["model"]["vocab_size"]
    meta["model"]["vocab_size"] = vocab + 6
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(
        ConfigError,
        match=rf"now has model.vocab_size {vocab}, this lora run was trained on {vocab + 6}",
    ):
        load_checkpoint_model(tmp_path / "lora/checkpoints", mesh)
