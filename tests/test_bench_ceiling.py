"""The matmul census behind `bench/train_throughput.py --ceiling`: which dots a step runs,
how often (a scan body once per iteration), and their FLOPs — counted by hand here."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import train_throughput as tt  # noqa: E402

NN = (((1,), (0,)), ((), ()))  # x @ w
NT = (((1,), (1,)), ((), ()))  # x @ w.T


def f(x, w):
    def body(c, _):
        return jnp.tanh(c @ w), None

    y, _ = jax.lax.scan(body, x, None, length=3)
    return jnp.einsum("ij,kj->ik", y, w)  # one more, with w transposed


def census(counts):
    return {(a.shape, b.shape, dn): n for (a, b, dn), n in counts.items()}


def test_step_dots_counts_scan_bodies_per_iteration_and_nested_jits():
    x, w = jnp.ones((4, 8)), jnp.ones((8, 8))
    want = {((4, 8), (8, 8), NN): 3, ((4, 8), (8, 8), NT): 1}
    assert census(tt.step_dots(f, x, w)) == want
    assert census(tt.step_dots(jax.jit(f), x, w)) == want  # inside a pjit


def test_step_dots_of_a_gradient_include_the_backward_dots():
    x, w = jnp.ones((4, 8)), jnp.ones((8, 8))
    # forward: 3 + 1; backward of y @ w.T: dy and dw (2); of each scan step c @ w: dc and dw (2)
    counts = tt.step_dots(jax.grad(lambda w: jnp.sum(f(x, w))), w)
    assert sum(counts.values()) == 4 + 2 + 3 * 2


def test_dots_alone_flops_and_counts():
    x, w = jnp.ones((4, 8)), jnp.ones((8, 16))
    # `w.T` is a transpose and then a plain dot with (16, 8)
    rows = tt.dots_alone(tt.step_dots(lambda x, w: (x @ w) @ w.T, x, w), repeats=1)
    by_shape = {(k[0].shape, k[1].shape): (flops, n) for _, flops, n, k in rows}
    assert by_shape == {
        ((4, 8), (8, 16)): (2 * 4 * 8 * 16, 1),
        ((4, 16), (16, 8)): (2 * 4 * 16 * 8, 1),
    }
    assert all(np.isfinite(t) and t > 0 for t, *_ in rows)
