"""The compiled pretrain step keeps the batch sharded: no device gathers the global batch.

Two checks per rule table, on the 8 simulated devices:

1. The compiled HLO (`compiled.as_text()`) has no all-gather of an activation. Activations are
   told apart by their sequence length: the batch uses L = 12, a size no weight has (vocab 64,
   d_model 32, heads 4/2, head size 8, d_ff 64, max_seq_len 16), so an `all-gather` whose
   result shape has a 12 moves tokens, not weights. FSDP's weight all-gathers are expected
   and allowed. This reads the program that runs, so it holds on a compilation-cache hit too.
2. XLA's SPMD partitioner logged no "Involuntary full rematerialization" (its C++ warning
   when it can only reshard by replicating a whole array). The log goes to the process's
   stderr file descriptor, so `capfd` sees it; the persistent compilation cache is switched
   off around the compile (a cache hit would compile nothing and log nothing).
"""

import contextlib
import re

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from jaxllm.config import MeshConfig, ModelConfig, OptimConfig
from jaxllm.sharding import make_mesh
from jaxllm.trainers.lm import lm_loss, model_fn
from jaxllm.training.optim import lr_schedule, make_optimizer
from jaxllm.training.state import create_train_state, to_global
from jaxllm.training.step import make_train_step

B, L = 24, 12
MODEL = ModelConfig(
    vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=16
)  # GPT-2 style: learned positions (a second table lookup), tied embeddings
OPT = OptimConfig(lr=1e-2, warmup_steps=2)
_ALL_GATHER = re.compile(r"=\s*(\S+)\s+all-gather(?:-start)?\(")


@contextlib.contextmanager
def no_compilation_cache():
    """Every compile in the block really compiles (and logs), whatever the test run set."""
    was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", was)
        compilation_cache.reset_cache()


def batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 64, size=(B, L + 1)).astype(np.int32)
    return {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": np.ones((B, L), np.int32),
        "positions": np.arange(L, dtype=np.int32)[None].repeat(B, 0),
        "loss_mask": np.ones((B, L), np.float32),
    }


def compiled_step_text(mesh_cfg: MeshConfig) -> str:
    """The pretrain step as the stage builds it, compiled for `mesh_cfg` on 8 devices."""
    mesh = make_mesh(mesh_cfg)
    tx = make_optimizer(OPT, 10)
    graphdef, state, sh = create_train_state(model_fn(MODEL, 0), tx, mesh, mesh_cfg.rules, 0)
    step = make_train_step(graphdef, lm_loss(), tx, lr_schedule(OPT, 10), sh, mesh, mesh_cfg.rules)
    return step.lower(state, to_global(batch(), mesh)).compile().as_text()


def activation_all_gathers(hlo: str) -> list[str]:
    """The all-gather lines of `hlo` whose result has the sequence-length dimension."""
    out = []
    for line in hlo.splitlines():
        m = _ALL_GATHER.search(line)
        dims = re.findall(r"\[([0-9,]*)\]", m.group(1)) if m else []
        if any(str(L) in d.split(",") for d in dims):
            out.append(line.strip()[:200])
    return out


@pytest.mark.parametrize(
    ("shape", "rules"),
    [((8, 1, 1), "dp"), ((1, 8, 1), "fsdp"), ((2, 4, 1), "fsdp"), ((2, 2, 2), "fsdp_tp")],
)
def test_train_step_never_gathers_the_batch(shape, rules, capfd):
    capfd.readouterr()
    with no_compilation_cache():
        hlo = compiled_step_text(MeshConfig(*shape, rules=rules))
    log = capfd.readouterr().err
    assert "all-gather" in hlo or rules == "dp"  # the weights are gathered (FSDP), so we see them
    assert activation_all_gathers(hlo) == []
    assert "Involuntary full rematerialization" not in log
