import jax
import jax.numpy as jnp
import numpy as np

from vi_seg_jax.ops.materialize import materialize


def _tree():
    return {"a": jnp.arange(6.0).reshape(2, 3), "b": (jnp.ones(4, jnp.int32),)}


def test_values_and_structure_are_unchanged():
    tree = _tree()
    out = jax.jit(materialize)(tree)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(tree)
    leaves = zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(tree), strict=True)
    for got, expected in leaves:
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)


def test_after_adds_an_operand_not_a_result():
    x, y = jnp.arange(5.0), jnp.full((7,), 2.0)
    out = jax.jit(lambda x, y: materialize(x * 2, after=y))(x, y)
    np.testing.assert_array_equal(out, x * 2)
    hlo = jax.jit(lambda x, y: materialize(x * 2, after=y)).lower(x, y).compile().as_text()
    call = next(line for line in hlo.splitlines() if "custom-call(" in line)
    operands = call.split("custom-call(")[1].split(")")[0].split(",")
    assert len(operands) == 2  # `after` is read by the call (one element of it) ...
    assert call.split("=")[1].strip().startswith("f32[5]")  # ... and not returned


def test_under_vmap():
    x = jnp.arange(12.0).reshape(3, 4)
    out = jax.vmap(lambda row: materialize(row + 1.0, after=row))(x)
    np.testing.assert_array_equal(out, x + 1.0)


def test_xla_cannot_merge_equal_expressions_through_it():
    def twice(x):
        return jnp.sin(x) + jnp.sin(materialize(x))

    hlo = jax.jit(twice).lower(jnp.ones(8)).compile().as_text()
    # Without the opaque call CSE would leave one sine.
    assert hlo.count(" sine(") == 2


def test_empty_tree():
    assert materialize({}) == {}


def test_gpu_and_tpu_get_an_optimization_barrier():
    exported = jax.export.export(jax.jit(materialize), platforms=("cuda", "tpu"))(jnp.ones(3))
    text = exported.mlir_module()
    assert "optimization_barrier" in text and "custom_call" not in text
