"""PPO's critic: a head on the actor's features (shared) or its own backbone copy (separate)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.models import make_decoder
from jaxllm.trainers.ppo import with_value_head

M = ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16)


@pytest.mark.parametrize("separate", [False, True])
def test_value_gradient_reaches_the_actor_only_when_shared(separate):
    with nnx.use_eager_sharding(False):
        model = with_value_head(make_decoder(M), nnx.Rngs(1), separate=separate)
    tokens = jax.random.randint(jax.random.key(0), (2, 7), 0, M.vocab_size)
    head = model.critic.head if separate else model.head  # starts at zero: give it a slope
    head.kernel[...] = jax.random.normal(jax.random.key(2), head.kernel.shape)
    graphdef, params = nnx.split(model, nnx.Param)

    def value_loss(params):
        _, values = nnx.merge(graphdef, params)(tokens)
        return jnp.sum(jnp.square(values - 1.0))

    grads = nnx.to_flat_state(jax.grad(value_loss)(params))
    actor = [np.abs(np.asarray(g[...])).max() for p, g in grads if p[0] == "decoder"]
    assert actor and (max(actor) > 0) != separate  # separate: no value gradient in the actor
    if separate:  # the critic's own backbone learns instead, and starts equal to the actor
        critic = [
            np.abs(np.asarray(g[...])).max() for p, g in grads if p[:2] == ("critic", "decoder")
        ]
        assert max(critic) > 0
        logits, _ = model(tokens)
        np.testing.assert_allclose(model.critic.decoder(tokens), logits, atol=1e-6)
