"""The sampler on the 8-device mesh: prompts, KV cache and outputs split by row over the
batch axes (pure data parallel, and FSDP + tensor parallel weights), with the same tokens
and log-probs as on one device, greedy and sampled with the same key."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from jaxllm.config import MeshConfig, ModelConfig
from jaxllm.generation import Sampler
from jaxllm.generation import sampler as sampler_mod
from jaxllm.models import make_decoder
from jaxllm.sharding import RULES, logical_spec, make_mesh
from jaxllm.sharding.batch import row_sharding

CFG = ModelConfig(
    vocab_size=80, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64,
    init_std=0.2, norm="rmsnorm", mlp="swiglu", positions="rope", use_bias=False,
    tie_embeddings=False,
)  # fmt: skip
PROMPTS = [[5, 17, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42], [9, 9, 30, 31, 2, 7]]
PROMPTS8 = PROMPTS + [[3, 4], [7] * 9, [1], [60, 61, 62]]
MESHES = {
    "data8": MeshConfig(data=8, rules="dp"),
    "fsdp_tp": MeshConfig(data=2, fsdp=2, tensor=2, rules="fsdp_tp"),
}
SETTINGS = {
    "greedy": dict(max_new_tokens=8, key=jax.random.key(0)),
    "sampled": dict(max_new_tokens=8, key=jax.random.key(3), temperature=0.8, top_k=10, top_p=0.9),
}


def placed(state: nnx.State, mesh, rules: str) -> nnx.State:
    """The weights where a train state under `rules` keeps them."""
    specs = nnx.get_partition_spec(state)
    table = RULES[rules]
    shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, logical_spec(tuple(s), table)), specs,
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
    )  # fmt: skip
    return jax.device_put(state, shardings)


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_sampler_equals_one_device(mesh_name, setting):
    graphdef, state = nnx.split(make_decoder(CFG, 0))
    kw = SETTINGS[setting]
    one = Sampler(graphdef)(state, PROMPTS8, **kw)
    m = MESHES[mesh_name]
    mesh = make_mesh(m)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    sampler = Sampler(graphdef, mesh=mesh, rules=m.rules)
    weights = placed(state, mesh, m.rules)
    out = sampler.generate(weights, PROMPTS8, **kw)
    for x in out:  # tokens, log-probs, counts, stop flags: each device holds its rows only
        assert x.sharding.is_equivalent_to(row_sharding(mesh, m.rules), x.ndim)
        assert {s.data.shape[0] for s in x.addressable_shards} == {8 // shards}
    assert np.asarray(out.tokens_BG)[:, :8].tolist() == [t + [0] * (8 - len(t)) for t in one.tokens]
    res = sampler(weights, PROMPTS8, **kw)
    assert res.tokens == one.tokens and res.num_tokens == one.num_tokens
    assert res.stopped == one.stopped
    for a, b in zip(res.logprobs, one.logprobs):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)
    # four prompts on eight rows: padded with copies, the same answers for the four
    assert sampler(weights, PROMPTS, **kw).tokens == one.tokens[:4]


def test_kv_cache_is_split_by_row_and_kv_head():
    graphdef, state = nnx.split(make_decoder(CFG, 0))
    m = MESHES["fsdp_tp"]
    mesh = make_mesh(m)
    sampler = Sampler(graphdef, mesh=mesh, rules=m.rules)
    tokens, seg, pos, _ = sampler_mod.pad_prompts(PROMPTS8, 16)
    prompt = sampler_mod.rows_to_global((tokens, seg, pos), mesh, m.rules)
    knobs = (np.float32(0), np.int32(0), np.float32(1))
    cache, tok, _ = sampler_mod._prefill(
        graphdef, placed(state, mesh, m.rules), prompt, sampler_mod._key_data(jax.random.key(0)),
        knobs, mode=sampler_mod.Mode(True, False), cache_size=80, layout=sampler.layout,
    )  # fmt: skip
    kv_spec = logical_spec(("act_batch", "act_heads", None, None), RULES[m.rules])
    for k in (*cache.k, *cache.v):
        assert k.sharding.is_equivalent_to(NamedSharding(mesh, kv_spec), k.ndim)
        assert k.addressable_shards[0].data.shape == (2, 1, 80, CFG.head_size)
    assert cache.segment_ids.sharding.is_equivalent_to(row_sharding(mesh, m.rules), 2)
    assert tok.sharding.is_equivalent_to(row_sharding(mesh, m.rules), 1)
