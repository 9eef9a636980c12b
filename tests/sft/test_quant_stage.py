"""Quantised checkpoints and QLoRA through the stages: `stage: quantize` writes int weights +
scales that load as such (equal to quantising on load), export refuses them (or dequantises on
request), and `peft: lora` on an int4 base trains only the adapters, the base bit-identical."""

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import QuantizeConfig, from_dict, replace
from jaxllm.config.peft import PeftConfig
from jaxllm.errors import ConfigError
from jaxllm.main import main
from jaxllm.models.quant import QuantScale, QuantWeight, is_quantized
from jaxllm.rundir import RunDir
from jaxllm.sharding import make_mesh
from jaxllm.trainers import quantize as quantize_stage
from jaxllm.trainers.hf_export import export_checkpoint
from jaxllm.trainers.lm import load_checkpoint_model, quantize_state
from jaxllm.training.checkpoint import Checkpointer

from .test_sft_stage import run_sft, sft_config


def _logits(graphdef, state, tokens):
    return np.asarray(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens))


def test_quantize_stage_checkpoint_and_export_refusal(tmp_path, tok, tiny_ckpt, capsys):
    cfg = from_dict({"stage": "quantize", "output_dir": str(tmp_path / "q8"), "progress": False,
                     "inputs": {"checkpoint": str(tiny_ckpt)}, "quantize": {"method": "int8"}})  # fmt: skip
    run_dir = RunDir.open(cfg)
    summary = run_dir.finish(quantize_stage.run(cfg, run_dir))
    assert summary["quantized_weights"] == 6  # q k v o up down of the one block (tied head)
    mem = summary["bytes_in_memory"]
    assert mem["total"] < summary["float_bytes_in_memory"]
    assert mem["quantized_values"] * 4 + mem["other"] == summary["float_bytes_in_memory"]

    mesh = make_mesh(cfg.mesh)
    g, state, _, meta = load_checkpoint_model(tmp_path / "q8/checkpoints", mesh)
    assert meta["quantize"]["method"] == "int8" and is_quantized(state)
    # the run keeps its tokenizer, so the folder loads alone once moved
    assert Path(meta["tokenizer"]).parent.resolve() == (tmp_path / "q8").resolve()
    assert (tmp_path / "q8/tokenizer.model").read_bytes() == Path(tok.path).read_bytes()
    saved = Checkpointer(tmp_path / "q8/checkpoints", async_save=False)
    step = saved.latest_step()
    names = str(saved.manager.item_metadata(step)["state"])
    assert "up_qscale" in names and "opt_state" not in names
    ints = jax.tree.leaves(nnx.filter_state(state, QuantWeight))
    assert ints and all(x.dtype == np.int8 for x in ints)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(nnx.filter_state(state, QuantScale)))

    # loading the quantised checkpoint = quantising the float one on load (what generate,
    # score and eval do with `quantize:`)
    gf, fstate, _, _ = load_checkpoint_model(tiny_ckpt, mesh)
    gq, qstate = quantize_state(gf, fstate, QuantizeConfig("int8"), mesh)
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, tok.vocab_size)
    np.testing.assert_array_equal(_logits(g, state, tokens), _logits(gq, qstate, tokens))

    with pytest.raises(ConfigError, match=r"is quantised .*hf.dequantize: true"):
        export_checkpoint(tmp_path / "q8/checkpoints", tmp_path / "hf")
    out = export_checkpoint(tmp_path / "q8/checkpoints", tmp_path / "hf", dequantize=True)
    assert (tmp_path / "hf" / "model.safetensors").is_file() and out["params"] > 0

    from tests.training.test_continued import args  # continued pretraining refuses int weights

    data = f"inputs.data_dir={tiny_ckpt.parent.parent / 'data'}"
    assert main(args(tmp_path / "q8/checkpoints", tmp_path / "cont", data)) == 2
    assert "holds quantised int weights" in capsys.readouterr().err
    # and so does full fine-tuning of it, naming the checkpoint (no quantize: section to undo)
    full = sft_config(tmp_path / "q8/checkpoints", tmp_path / "sft_q8")
    with pytest.raises(ConfigError, match=r"inputs.checkpoint .*q8/checkpoints is quantised"):
        run_sft(full)


@pytest.mark.slow
def test_qlora_trains_adapters_only_on_int4_base(tmp_path, tok, tiny_ckpt):
    cfg = sft_config(tiny_ckpt, tmp_path / "qlora")
    cfg = replace(cfg, peft=PeftConfig("lora", rank=4, alpha=8.0),
                  quantize=QuantizeConfig("int4", group_size=16))  # fmt: skip
    cfg = replace(cfg, train=replace(cfg.train, optim=replace(cfg.train.optim, lr=1e-2)))
    summary = run_sft(cfg)
    assert summary["trainable_params"] == 4 * 64 * 4 + 2 * 96 * 4  # as LoRA on a float base
    assert summary["val_loss_after"] < summary["val_loss_before"]

    mesh = make_mesh(cfg.mesh)
    saved = Checkpointer(tmp_path / "qlora/checkpoints", async_save=False)
    names = str(saved.manager.item_metadata(4)["state"])
    assert "q_lora_a" in names and "qscale" not in names and "'up'" not in names
    g, adapted, _, meta = load_checkpoint_model(tmp_path / "qlora/checkpoints", mesh)
    gf, fstate, _, _ = load_checkpoint_model(tiny_ckpt, mesh)
    _, base = quantize_state(gf, fstate, cfg.quantize, mesh)
    # the int4 base is bit-identical to quantising the float base; adapters are float and moved
    adapted_base = nnx.filter_state(adapted, nnx.Not(nnx.LoRAParam))
    for a, b in zip(jax.tree.leaves(adapted_base), jax.tree.leaves(base), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(x.dtype == np.dtype("int4") for x in jax.tree.leaves(adapted_base))
    lora = jax.tree.leaves(nnx.filter_state(adapted, nnx.LoRAParam))
    assert lora and all(x.dtype == np.float32 for x in lora)

    # full fine-tuning of an int base is refused, naming the key
    bad = replace(cfg, peft=PeftConfig(), output_dir=str(tmp_path / "bad"))
    with pytest.raises(ConfigError, match="peft.method"):
        run_sft(bad)
