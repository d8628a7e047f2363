"""Every formulation of `_blocks.conv_general_dilated` equals `lax.conv_general_dilated`.

Values and gradients (w.r.t. input and kernel) are compared for 2D and 3D channels-last
convs, strides 1 and 2, SAME / VALID / explicit padding and several channel counts, under
each implementation `conv_impl` can select (`"auto"` is what the backbones use).
"""

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from jax import lax

from vi_seg_jax.backbones._blocks import (
    CONV_IMPLS,
    _auto_impl,
    conv_general_dilated,
    conv_impl,
)

# (input shape, kernel shape, strides, padding): the backbones' convs and odd sizes.
CASES_3D = [
    ((2, 6, 5, 7, 3), (3, 3, 3, 3, 4), (1, 1, 1), ((1, 1),) * 3),  # conv3
    ((1, 6, 6, 6, 4), (3, 3, 3, 4, 4), (1, 1, 1), "SAME"),
    ((1, 7, 6, 5, 2), (3, 3, 3, 2, 5), (1, 1, 1), "VALID"),
    ((1, 6, 5, 4, 3), (3, 3, 3, 3, 2), (1, 1, 1), ((2, 0), (0, 1), (1, 2))),
    ((1, 5, 6, 4, 8), (1, 1, 1, 8, 3), (1, 1, 1), "VALID"),  # conv1
    ((2, 8, 6, 10, 3), (3, 3, 3, 3, 4), (2, 2, 2), ((1, 1),) * 3),  # strided conv3
    ((1, 9, 8, 7, 3), (3, 3, 3, 3, 4), (2, 2, 2), "SAME"),
    ((1, 8, 6, 10, 3), (1, 1, 1, 3, 4), (2, 2, 2), "VALID"),  # strided shortcut
    ((1, 8, 8, 8, 3), (2, 2, 2, 3, 6), (2, 2, 2), "VALID"),  # V-Net down conv
    ((1, 8, 8, 8, 3), (3, 3, 3, 3, 4), (2, 1, 2), ((1, 1),) * 3),
    ((1, 6, 6, 6, 2), (5, 5, 5, 2, 3), (1, 1, 1), "SAME"),
    ((1, 4, 5, 6, 16), (3, 3, 3, 16, 8), (1, 1, 1), ((1, 1),) * 3),
]
CASES_2D = [
    ((2, 8, 8, 3), (3, 3, 3, 4), (1, 1), ((1, 1),) * 2),
    ((2, 8, 8, 3), (3, 3, 3, 4), (2, 2), ((1, 1),) * 2),
    ((1, 7, 9, 5), (3, 3, 5, 2), (1, 1), "SAME"),
    ((1, 8, 8, 5), (1, 1, 5, 2), (2, 2), "VALID"),
]


def _array(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _value_and_grads(conv, x, w, strides, padding):
    dn = ("NHWC", "HWIO", "NHWC") if x.ndim == 4 else ("NDHWC", "DHWIO", "NDHWC")

    def loss(x, w):
        y = conv(x, w, strides, padding, dimension_numbers=dn)
        return jnp.sum(jnp.sin(y)), y

    (_, y), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, w)
    return y, grads


def _check(impl, x_shape, k_shape, strides, padding):
    x, w = _array(x_shape, 1), _array(k_shape, 2)
    y_ref, g_ref = jax.jit(
        lambda x, w: _value_and_grads(lax.conv_general_dilated, x, w, strides, padding)
    )(x, w)
    with conv_impl(impl):  # the choice is read at trace time: jit inside the block
        y, g = jax.jit(lambda x, w: _value_and_grads(conv_general_dilated, x, w, strides, padding))(
            x, w
        )
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    # float32 sums in another order: errors relative to the array's scale (~1e-6 seen).
    np.testing.assert_allclose(y, y_ref, atol=1e-5 * float(np.max(np.abs(y_ref))), rtol=1e-5)
    for a, b in zip(g, g_ref, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, atol=1e-5 * float(np.max(np.abs(b))), rtol=1e-5)


# Every stride-1 formulation on the stride-1 cases ("s2d" is XLA's own conv there, and
# "fold_stacked" combines "stacked" and "fold", so it gets two); the strided rewrite feeds
# its stride-1 conv to the selected formulation: strided cases under "auto" (GEMM / folds
# by size), "s2d" (the rewrite alone) and "gemm".
STRIDE1_IMPLS = ("auto", "stacked", "summed", "fold", "gemm")
STRIDED_IMPLS = ("auto", "s2d", "gemm")
CASES_3D_BY_IMPL = [
    pytest.param(impl, *case, id=f"{impl}-{i}")
    for impl in CONV_IMPLS
    for i, case in enumerate(CASES_3D)
    if impl in (STRIDED_IMPLS if max(case[2]) > 1 else STRIDE1_IMPLS)
    or (impl == "fold_stacked" and i in (0, 3))
]


@pytest.mark.parametrize(("impl", "x_shape", "k_shape", "strides", "padding"), CASES_3D_BY_IMPL)
def test_3d_matches_lax(impl, x_shape, k_shape, strides, padding):
    _check(impl, x_shape, k_shape, strides, padding)


@pytest.mark.parametrize(("x_shape", "k_shape", "strides", "padding"), CASES_2D)
def test_2d_matches_lax(x_shape, k_shape, strides, padding):
    _check("auto", x_shape, k_shape, strides, padding)


@pytest.mark.parametrize("impl", ["gemm", "summed", "stacked"])
def test_check_grads_numerically(impl):
    """Numerical gradient check of the rewritten forms (first order, both arguments)."""
    x, w = _array((1, 4, 3, 5, 2), 3), _array((3, 3, 3, 2, 3), 4)
    dn = ("NDHWC", "DHWIO", "NDHWC")
    with conv_impl(impl):
        jax.test_util.check_grads(
            lambda x, w: conv_general_dilated(x, w, (1, 1, 1), ((1, 1),) * 3, dimension_numbers=dn),
            (x, w),
            order=1,
            modes=("rev",),
            atol=1e-2,
            rtol=1e-2,
        )


@pytest.mark.parametrize("impl", ["auto", "gemm", "summed"])
def test_bfloat16_close_to_lax(impl):
    x, w = _array((1, 6, 6, 6, 4), 5), _array((3, 3, 3, 4, 4), 6)
    x, w = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    dn = ("NDHWC", "DHWIO", "NDHWC")
    ref = lax.conv_general_dilated(x, w, (1, 1, 1), ((1, 1),) * 3, dimension_numbers=dn)
    with conv_impl(impl):
        y = jax.jit(
            lambda x, w: conv_general_dilated(x, w, (1, 1, 1), ((1, 1),) * 3, dimension_numbers=dn)
        )(x, w)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(y, np.float32), np.asarray(ref, np.float32), atol=0.1, rtol=0.02
    )


def test_auto_choices_follow_the_measured_rule():
    """ "auto" (the backbones' default): GEMM kernel gradients for the large and the 2-tap
    (strided-rewrite) convs, the whole GEMM form for few input channels, 2D folds else."""
    same = ((1, 1),) * 3
    assert _auto_impl((2, 64, 64, 64, 16), (3, 3, 3, 16, 16), same) == "fold"
    assert _auto_impl((2, 64, 64, 64, 4), (3, 3, 3, 4, 16), same) == "gemm"
    assert _auto_impl((2, 33, 33, 33, 128), (2, 2, 2, 128, 32), ((0, 0),) * 3) == "fold"
    assert _auto_impl((2, 16, 16, 16, 64), (3, 3, 3, 64, 64), same) == "summed"
    assert _auto_impl((2, 16, 16, 16, 4), (3, 3, 3, 4, 8), same) == "stacked"


def test_auto_kernel_gradient_is_a_gemm():
    """Under "auto" a 2-tap conv's kernel gradient is a dot, not an XLA (transposed) conv."""
    x, w = _array((1, 5, 5, 5, 3), 7), _array((2, 2, 2, 3, 2), 8)
    dn = ("NDHWC", "DHWIO", "NDHWC")

    def loss(w):
        return jnp.sum(conv_general_dilated(x, w, (1, 1, 1), "VALID", dimension_numbers=dn))

    with conv_impl("auto"):
        jaxpr = jax.make_jaxpr(jax.grad(loss))(w)
    names = {e.primitive.name for e in jaxpr.jaxpr.eqns}
    if jax.default_backend() != "cpu":  # "auto" is CPU-measured; accelerators keep XLA's convs
        assert "dot_general" not in names
        return
    assert "dot_general" in names
    assert "conv_general_dilated" not in names  # the kernel gradient needs no conv


def test_unknown_impl_raises():
    with pytest.raises(ValueError, match="conv impl"), conv_impl("nope"):
        pass
