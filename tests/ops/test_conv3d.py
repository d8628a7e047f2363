"""Every formulation of `ConvEngine` equals `lax.conv_general_dilated`.

Values and gradients (w.r.t. input and kernel) are compared for 2D and 3D channels-last
convs, strides 1 and 2, SAME / VALID / explicit padding and several channel counts, under
each formulation an engine can force, and under mixed choices (each piece of a conv by
another formulation), which is what tuning produces.
"""

import contextlib
import io

import flax.linen as nn
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from jax import lax

from vi_seg_jax.backbones import UNet
from vi_seg_jax.ops import CONV_IMPLS, ConvChoice, ConvEngine, onednn
from vi_seg_jax.ops.conv3d import conv_stride1
from vi_seg_jax.ops.conv_tuning import rule_form

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
DN_3D = ("NDHWC", "DHWIO", "NDHWC")


def _array(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _value_and_grads(conv, x, w, strides, padding):
    dn = ("NHWC", "HWIO", "NHWC") if x.ndim == 4 else DN_3D

    def loss(x, w):
        y = conv(x, w, strides, padding, dimension_numbers=dn)
        return jnp.sum(jnp.sin(y)), y

    (_, y), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, w)
    return y, grads


def _assert_close_to_lax(conv, x_shape, k_shape, strides, padding):
    x, w = _array(x_shape, 1), _array(k_shape, 2)
    y_ref, g_ref = jax.jit(
        lambda x, w: _value_and_grads(lax.conv_general_dilated, x, w, strides, padding)
    )(x, w)
    y, g = jax.jit(lambda x, w: _value_and_grads(conv, x, w, strides, padding))(x, w)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    # float32 sums in another order: errors relative to the array's scale (~1e-6 seen).
    np.testing.assert_allclose(y, y_ref, atol=1e-5 * float(np.max(np.abs(y_ref))), rtol=1e-5)
    for a, b in zip(g, g_ref, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, atol=1e-5 * float(np.max(np.abs(b))), rtol=1e-5)


# Every formulation on the stride-1 cases; the strided rewrite feeds its stride-1 conv to
# the selected formulation: strided cases under "auto", "xla" (the rewrite alone), "gemm".
STRIDE1_IMPLS = ("auto", "xla", "stacked", "summed", "gemm", "onednn")
STRIDED_IMPLS = ("auto", "xla", "gemm", "onednn")
CASES_3D_BY_IMPL = [
    pytest.param(impl, *case, id=f"{impl}-{i}")
    for impl in CONV_IMPLS
    for i, case in enumerate(CASES_3D)
    if impl in (STRIDED_IMPLS if max(case[2]) > 1 else STRIDE1_IMPLS)
    or (impl == "lax" and i in (0, 5))
]


@pytest.mark.parametrize(("impl", "x_shape", "k_shape", "strides", "padding"), CASES_3D_BY_IMPL)
def test_3d_matches_lax(impl, x_shape, k_shape, strides, padding):
    _assert_close_to_lax(ConvEngine(impl), x_shape, k_shape, strides, padding)


@pytest.mark.parametrize(("x_shape", "k_shape", "strides", "padding"), CASES_2D)
def test_2d_matches_lax(x_shape, k_shape, strides, padding):
    _assert_close_to_lax(ConvEngine(), x_shape, k_shape, strides, padding)


@pytest.mark.parametrize(
    "choice",
    [
        ConvChoice("gemm", "summed", "xla"),
        ConvChoice("stacked", "gemm", "summed"),
        ConvChoice("xla", "stacked", "gemm"),
        ConvChoice("summed", "xla", "stacked"),
        ConvChoice("gemm", "summed", "summed@2"),
        ConvChoice("stacked", "gemm", "stacked@8"),
        ConvChoice("onednn", "summed", "gemm"),
        ConvChoice("gemm", "onednn", "onednn"),
    ],
    ids=str,
)
@pytest.mark.parametrize("case", [0, 3], ids=["same", "uneven-pads"])
def test_mixed_choices_match_lax(choice, case):
    """Tuning picks each piece separately: every mix of formulations is the same conv."""
    x_shape, k_shape, _, padding = CASES_3D[case]

    def conv(x, w, strides, padding, dimension_numbers):
        del strides, dimension_numbers
        return conv_stride1(x, w, padding, choice, None, None)

    _assert_close_to_lax(conv, x_shape, k_shape, (1, 1, 1), padding)


@pytest.mark.parametrize("impl", ["gemm", "summed", "stacked"])
def test_check_grads_numerically(impl):
    """Numerical gradient check of the rewritten forms (first order, both arguments)."""
    x, w = _array((1, 4, 3, 5, 2), 3), _array((3, 3, 3, 2, 3), 4)
    engine = ConvEngine(impl)
    jax.test_util.check_grads(
        lambda x, w: engine(x, w, (1, 1, 1), ((1, 1),) * 3, dimension_numbers=DN_3D),
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
    ref = lax.conv_general_dilated(x, w, (1, 1, 1), ((1, 1),) * 3, dimension_numbers=DN_3D)
    engine = ConvEngine(impl)
    y = jax.jit(lambda x, w: engine(x, w, (1, 1, 1), ((1, 1),) * 3, dimension_numbers=DN_3D))(x, w)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(y, np.float32), np.asarray(ref, np.float32), atol=0.1, rtol=0.02
    )


def test_rule_where_nothing_was_measured(monkeypatch):
    """oneDNN where it is available; else the size rule: GEMMs for the large and the 2-tap
    (strided-rewrite) convs, stacked taps for few input channels, 2D folds for the small
    levels; XLA's convs off CPUs."""
    same = ((1, 1),) * 3
    with_onednn = rule_form((2, 8, 8, 8, 4), (3, 3, 3, 4, 8), same, "forward", "cpu")
    assert with_onednn == ("onednn" if onednn.available() else "stacked")
    monkeypatch.setattr(onednn, "available", lambda dtype=None: False)
    big, few, small = (2, 64, 64, 64, 16), (2, 64, 64, 64, 4), (2, 16, 16, 16, 64)
    assert rule_form(big, (3, 3, 3, 16, 16), same, "forward", "cpu") == "summed"
    assert rule_form(big, (3, 3, 3, 16, 16), same, "kernel_grad", "cpu") == "gemm"
    assert rule_form(few, (3, 3, 3, 4, 16), same, "forward", "cpu") == "gemm"
    assert rule_form((2, 33, 33, 33, 128), (2, 2, 2, 128, 32), ((0, 0),) * 3, "forward", "cpu") in (
        "summed"
    )
    assert rule_form(small, (3, 3, 3, 64, 64), same, "forward", "cpu") == "summed"
    assert rule_form((2, 16, 16, 16, 4), (3, 3, 3, 4, 8), same, "forward", "cpu") == "stacked"
    assert rule_form(big, (3, 3, 3, 16, 16), same, "forward", "gpu") == "xla"


def _primitives(f, *args) -> set[str]:
    def names(jaxpr):
        found = set()
        for eqn in jaxpr.eqns:
            found.add(eqn.primitive.name)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                found |= names(sub)
        return found

    return names(jax.make_jaxpr(f)(*args).jaxpr)


def test_gemm_kernel_gradient_needs_no_conv():
    x, w = _array((1, 5, 5, 5, 3), 7), _array((2, 2, 2, 3, 2), 8)
    engine = ConvEngine("gemm")

    def loss(w):
        return jnp.sum(engine(x, w, (1, 1, 1), "VALID", dimension_numbers=DN_3D))

    names = _primitives(jax.grad(loss), w)
    assert "dot_general" in names
    assert "conv_general_dilated" not in names


def test_the_choice_is_part_of_the_traced_program():
    """Two engines in one process trace two programs: a compiled function can never keep a
    stale choice, and equal engines are one static value (no retracing)."""
    assert ConvEngine("gemm") == ConvEngine("gemm") and hash(ConvEngine()) == hash(ConvEngine())
    x = jnp.zeros((1, 8, 8, 8, 2), jnp.float32)
    programs = {}
    for impl in ("gemm", "xla"):
        model = UNet(2, features=(4, 8), conv=ConvEngine(impl))
        params = jax.eval_shape(model.init, jax.random.key(0), x)
        programs[impl] = _primitives(lambda p, x, m=model: m.apply(p, x)[0], params, x)
    assert "conv_general_dilated" not in programs["gemm"]
    assert "conv_general_dilated" in programs["xla"]


def test_unknown_impl_raises():
    with pytest.raises(ValueError, match="conv impl"):
        ConvEngine("nope")


@pytest.mark.parametrize("impl", ["gemm", "summed", "stacked", "xla"])
def test_backward_keeps_only_the_operands(impl):
    """The custom VJP saves the input and the kernel, never an expanded copy (stacked taps
    are 3-27× the input): what the backward pass needs is rebuilt there."""
    x, w = _array((1, 6, 6, 6, 4), 9), _array((3, 3, 3, 4, 5), 10)
    engine = ConvEngine(impl)

    def f(x, w):
        return jnp.sum(engine(x, w, (1, 1, 1), ((1, 1),) * 3, dimension_numbers=DN_3D))

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(f, x, w)
    saved = [line for line in out.getvalue().splitlines() if line.strip()]
    assert len(saved) == 2, saved
    assert any("f32[1,6,6,6,4]" in line for line in saved)
    assert any("f32[3,3,3,4,5]" in line for line in saved)


def test_backbone_convs_take_the_engine():
    engine = ConvEngine("summed")
    model = UNet(2, spatial_dims=3, features=(4, 8), conv=engine)
    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Conv):
            seen.append(context.module.conv_general_dilated)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 8, 1)))
    assert seen and all(conv is engine for conv in seen)
