"""Held-out preference figures across hosts: two real processes joined by `jax.distributed`
(CPU, gloo collectives) each score their share of the pairs (and of KTO's examples), and
both end up with every pair (example), its weight and task — the same rows a single
process collects."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from jaxllm.config import LoaderConfig, MeshConfig
from jaxllm.sharding import make_mesh
from jaxllm.trainers.reward import PairPass

from .conftest import ROOT
from .multihost_worker import example_pass
from .test_reward_stage import small_val


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_pair_pass_gathers_every_pair_on_both_processes(tmp_path, tok, template):
    data = small_val(tmp_path, n=7)  # rankings (3 pairs each) and math pairs: uneven shares
    port = str(_free_port())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.alignment.multihost_worker",
                str(i),
                port,
                str(tok.path),
                str(data),
                str(tmp_path / f"rows{i}.json"),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in (0, 1)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out[-2000:]
    got = [json.loads((tmp_path / f"rows{i}.json").read_text()) for i in (0, 1)]
    assert got[0] == got[1]  # both processes hold the same, global rows
    assert got[0]["processes"] == 2 and got[0]["devices"] == 2
    # one process over the same file: the same pairs with the same figures
    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
    one = PairPass([data], template, LoaderConfig(seq_len=64, batch_size=4), mesh)
    ref = one.collect(jax.jit(lambda b: {"tokens": b["loss_mask"].sum(axis=(1, 2))}))
    real = np.asarray(got[0]["pair"]) >= 0
    assert sorted(np.asarray(got[0]["pair"])[real]) == list(range(one.size))
    for pair in range(one.size):
        i = got[0]["pair"].index(pair)
        j = list(ref["pair"]).index(pair)
        assert got[0]["tokens"][i] == ref["tokens"][j] > 0
        assert got[0]["weight"][i] == ref["weight"][j] and got[0]["task"][i] == ref["task"][j]
    # the KTO evaluator's pass over the same file's examples (a pair gives two): the same
    loader = LoaderConfig(seq_len=64, batch_size=4)
    one = example_pass(data, template, loader, mesh)
    ref = one.collect(jax.jit(lambda b: {"tokens": b["loss_mask"].sum(axis=1)}))
    ex = got[0]["examples"]
    assert ex == got[1]["examples"]
    real = np.asarray(ex["example"]) >= 0
    assert sorted(np.asarray(ex["example"])[real]) == list(range(one.size)) and one.size > 14
    for e in range(one.size):
        i, j = ex["example"].index(e), list(ref["example"]).index(e)
        assert ex["tokens"][i] == ref["tokens"][j] > 0 and ex["task"][i] == ref["task"][j]
        assert ex["weight"][i] == ref["weight"][j]
