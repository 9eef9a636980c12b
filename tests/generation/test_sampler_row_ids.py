"""Row-keyed draws (`Sampler(..., row_ids=)`): a row's tokens depend on the key and its id
only, not on the batch around it nor on the mesh; without `row_ids` the sampler draws
exactly as it always has (tokens recorded from the code before `row_ids` existed)."""

import jax
import numpy as np
import pytest

from jaxllm.config import MeshConfig
from jaxllm.generation import Sampler
from jaxllm.sharding import make_mesh
from tests.generation.test_sampler import PROMPTS, model, reference_logits, run

# `run("llama", key=jax.random.key(3), **kw).tokens` printed by the sampler as it was before
# `row_ids` (jaxllm/generation/sampler.py at commit e5023d9, copied to /tmp and run): the
# default path must keep drawing these exact tokens (every existing caller relies on it).
OLD_TOKENS = {
    "t1": [[8, 66, 15, 13, 1, 9, 1, 44], [54, 15, 30, 56, 15, 65, 71, 34],
           [31, 52, 36, 47, 38, 78, 20, 4], [46, 56, 1, 59, 65, 31, 10, 59]],
    "filtered": [[79, 21, 61, 34, 34, 21, 23, 43], [75, 15, 65, 39, 30, 13, 46, 30],
                 [31, 23, 23, 50, 43, 54, 23, 67], [46, 44, 37, 23, 44, 68, 23, 47]],
}  # fmt: skip
SETTINGS = {"t1": dict(temperature=1.0), "filtered": dict(temperature=0.8, top_k=10, top_p=0.9)}
KEY = jax.random.key(3)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_default_draws_are_those_of_the_old_sampler(setting):
    assert run("llama", key=KEY, **SETTINGS[setting]).tokens == OLD_TOKENS[setting]


def keyed(prompts, ids, **kw):
    graphdef, state = model("llama")
    return Sampler(graphdef)(state, prompts, key=KEY, max_new_tokens=8, row_ids=ids, **kw)


def test_a_row_draws_the_same_alone_in_a_batch_or_elsewhere_in_it():
    kw = SETTINGS["filtered"]  # top-k / top-p too: filtered per row
    ids = [7, 3, 12, 0]
    batch = keyed(PROMPTS, ids, **kw).tokens
    assert [keyed([PROMPTS[i]], [ids[i]], **kw).tokens[0] for i in (0, 3)] == [batch[0], batch[3]]
    order = [2, 0, 3, 1]  # other positions, two more rows around them
    more = [[4, 4], [8]]
    shuffled = keyed([PROMPTS[i] for i in order] + more, [ids[i] for i in order] + [1, 2], **kw)
    assert shuffled.tokens[:4] == [batch[i] for i in order]


def test_row_keyed_tokens_are_categorical_draws_with_the_row_step_key():
    """Independently: token t of row id r is categorical(fold_in(fold_in(key, r), t)) over
    the full-forward logits (no cache) of the prompt and the tokens before it."""
    ids = [5, 9, 2, 30]
    res = keyed(PROMPTS, ids, temperature=1.0)
    for prompt, r, toks in zip(PROMPTS, ids, res.tokens):
        logits = reference_logits("llama", prompt + toks)[len(prompt) - 1 : -1]
        row_key = jax.random.fold_in(KEY, r)
        want = [
            int(jax.random.categorical(jax.random.fold_in(row_key, t), logits[t]))
            for t in range(len(toks))
        ]
        assert toks == want
    assert keyed(PROMPTS, [6, 9, 2, 30], temperature=1.0).tokens[0] != res.tokens[0]  # by id


def test_row_keyed_draws_are_the_same_on_a_mesh():
    graphdef, state = model("llama")
    ids = [4, 1, 6, 3]
    one = keyed(PROMPTS, ids, temperature=1.0)
    sampler = Sampler(graphdef, mesh=make_mesh(MeshConfig(data=8, rules="dp")), rules="dp")
    res = sampler(state, PROMPTS, key=KEY, max_new_tokens=8, temperature=1.0, row_ids=ids)
    assert res.tokens == one.tokens  # four rows padded to eight
    for a, b in zip(res.logprobs, one.logprobs):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="row_ids"):
        sampler(state, PROMPTS, key=KEY, max_new_tokens=8, row_ids=[1, 2])
