"""The matmul census behind the benches' `--ceiling` (`jaxllm.training.peak`): which dots a
step runs, how often (a scan body once per iteration), and their FLOPs — counted by hand here."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.training import peak

NN = (((1,), (0,)), ((), ()))  # x @ w
NT = (((1,), (1,)), ((), ()))  # x @ w.T


def f(x, w):
    def body(c, _):
        return jnp.tanh(c @ w), None

    y, _ = jax.lax.scan(body, x, None, length=3)
    return jnp.einsum("ij,kj->ik", y, w)  # one more, with w transposed


def census(counts):
    return {(a.shape, b.shape, dn): n for (a, b, dn, _), n in counts.items()}


def test_step_dots_counts_scan_bodies_per_iteration_and_nested_jits():
    x, w = jnp.ones((4, 8)), jnp.ones((8, 8))
    want = {((4, 8), (8, 8), NN): 3, ((4, 8), (8, 8), NT): 1}
    assert census(peak.matmul_census(f, x, w)) == want
    assert census(peak.matmul_census(jax.jit(f), x, w)) == want  # inside a pjit


def test_step_dots_of_a_gradient_include_the_backward_dots():
    x, w = jnp.ones((4, 8)), jnp.ones((8, 8))
    # forward: 3 + 1; backward of y @ w.T: dy and dw (2); of each scan step c @ w: dc and dw (2)
    counts = peak.matmul_census(jax.grad(lambda w: jnp.sum(f(x, w))), w)
    assert sum(counts.values()) == 4 + 2 + 3 * 2


def test_dots_alone_flops_and_counts():
    x, w = jnp.ones((4, 8)), jnp.ones((8, 16))
    # `w.T` is a transpose and then a plain dot with (16, 8)
    rows = peak.time_dots_alone(peak.matmul_census(lambda x, w: (x @ w) @ w.T, x, w), repeats=1)
    by_shape = {(k[0].shape, k[1].shape): (flops, n) for _, flops, n, k in rows}
    assert by_shape == {
        ((4, 8), (8, 16)): (2 * 4 * 8 * 16, 1),
        ((4, 16), (16, 8)): (2 * 4 * 16 * 8, 1),
    }
    assert all(np.isfinite(t) and t > 0 for t, *_ in rows)


def test_bound_lines_arithmetic():
    a, b = jax.core.ShapedArray((4, 8), jnp.float32), jax.core.ShapedArray((8, 8), jnp.float32)
    # two dots: 3 x 10 ms of 2 GFLOP and 1 x 40 ms of 4 GFLOP -> 70 ms for 10 GFLOP
    rows = [(0.010, 2e9, 3, (a, b, NN, None)), (0.040, 4e9, 1, (a, b, NT, None))]
    lines = peak.bound_lines(rows, model_flops=7e9, peak=200e9, step_s=0.2)
    assert "4 dots (2 shapes, 10.0 GFLOP; the model counts 7.0) take 70.0 ms" in lines[0]
    assert "143 GFLOP/s = 71% of the peak" in lines[0]  # 10 / 0.07 = 142.9 GFLOP/s
    assert "everything else free: 50.0%" in lines[1]  # 7e9 / 0.07 / 200e9
    assert "spends 130.0 ms (65%) beyond its dots" in lines[1]
    assert lines[3].split()[:3] == ["40.0", "=", "1"]  # the slowest in total comes first


def test_matmul_bound_times_every_dot_of_the_function():
    x, w = jnp.ones((64, 64)), jnp.ones((64, 64))
    lines = peak.matmul_bound(lambda x, w: (x @ w) @ w, (x, w), 1e6, peak=1e12, step_s=1.0)
    assert lines[0].startswith("matmul-only bound: the step's 2 dots (1 shapes, 0.0 GFLOP")
    assert len(lines) == 4  # one distinct shape listed
