"""The documents' model sizes as presets: parameter counts by the project's formula and by
the abstract module (no weights allocated) against the published figures."""

import math

import jax
import pytest
from flax import nnx

from jaxllm.config import from_dict
from jaxllm.models import Decoder
from jaxllm.models.flops import param_count
from jaxllm.models.layers import ParamKeys

# Hugging Face's gpt2, gpt2-medium, gpt2-large, gpt2-xl: their parameter counts (the GPT-2
# paper's table 2 says 117M, 345M, 762M and 1542M, counted without some embeddings)
GPT2 = {"gpt2_124m": 124_439_808, "gpt2_350m": 354_823_168, "gpt2_774m": 774_030_080,
        "gpt2_1558m": 1_557_611_200}  # fmt: skip


def preset(name: str):
    return from_dict({"stage": "pretrain", "model": {"preset": name}}).model


def abstract_count(m) -> int:
    state = nnx.state(nnx.eval_shape(lambda: Decoder(m, rngs=ParamKeys(0))), nnx.Param)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


@pytest.mark.parametrize("name", sorted(GPT2))
def test_gpt2_sizes_match_the_published_models(name):
    m = preset(name)
    assert param_count(m) == GPT2[name]
    assert abstract_count(m) == GPT2[name]


def test_gpt3_175b_shape():
    m = preset("gpt3_175b")
    assert (m.n_layers, m.d_model, m.n_heads, m.head_size) == (96, 12288, 96, 128)
    assert param_count(m) == pytest.approx(175.0e9, rel=0.005)  # the paper's 175.0B
    assert abstract_count(m) == param_count(m)  # all 96 layers, built abstractly
