"""Ops that a device mesh splits by rows (`vi_seg_jax.ops.partitioning`), on one device.

Over a mesh, `tests/test_parallel.py` checks that training with oneDNN's convolutions,
`materialize` and the LRT's noise equals one device's, with no activation gathered.
"""

import jax
import jax.numpy as jnp
import numpy as np

from vi_seg_jax.ops.partitioning import elementwise, rowwise


def _scaled_rows(x, w, *, rows):
    assert rows is None  # one device: the whole batch
    return x * w


def test_rowwise_op_on_one_device_is_its_function_of_the_whole_batch():
    op = rowwise(_scaled_rows, (True, False))
    x, w = jnp.arange(12.0).reshape(3, 4), jnp.asarray(2.0)
    np.testing.assert_array_equal(jax.jit(op)(x, w), x * w)


def test_rowwise_op_under_vmap_runs_once_per_element():
    calls = []

    def summed_rows(x, y, *, rows):
        calls.append(x.shape)
        return jnp.einsum("bi,bj->ij", x, y)

    op = rowwise(summed_rows, (True, True), summed=True)
    x = jax.random.normal(jax.random.key(0), (5, 3, 2))
    y = jax.random.normal(jax.random.key(1), (5, 3, 4))
    batched = jax.vmap(op)(x, y)
    assert calls and all(shape == (3, 2) for shape in calls)  # never a vmapped operand
    for i in range(5):
        np.testing.assert_allclose(batched[i], x[i].T @ y[i], rtol=1e-6)


def test_elementwise_op_under_vmap_keeps_batched_and_dependency_operands():
    op = elementwise(lambda x, dependency: (x + 0 * dependency,), 1)
    x = jnp.arange(6.0).reshape(2, 3)
    (out,) = jax.vmap(lambda row: op(row, jnp.zeros(())))(x)
    np.testing.assert_array_equal(out, x)
    (unbatched,) = op(x, jnp.zeros(()))
    np.testing.assert_array_equal(unbatched, x)
