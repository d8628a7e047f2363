"""Backbones: shapes, pinned parameter counts, errors, dropout, conv layout, jit.

Compilation dominates: tiny features, tiny inputs, `jax.eval_shape` wherever values are not
needed, parameters filled from numpy (compiling the threefry initialisers costs seconds), and
`jax_disable_most_optimizations` for this module.
"""

from __future__ import annotations

import itertools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from jax import lax

from vi_seg_jax.backbones import (
    BACKBONES,
    FCN,
    Backbone,
    UNet,
    VNet,
    conv1,
    conv3,
    count_params,
    get_backbone,
)
from vi_seg_jax.backbones.blocks import (
    DEFAULT_CONV,
    depth_to_space,
    instance_norm,
    upsample2x,
)

TINY = (4, 8, 8, 16)  # depth 3: spatial sizes must be multiples of 8
CLASSES = (UNet, VNet, FCN)


@pytest.fixture(scope="module", autouse=True)
def _fast_compile():
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def _abstract(shape) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.float32)


def _param_shapes(model: nn.Module, input_shape) -> dict:
    return jax.eval_shape(model.init, jax.random.key(0), _abstract(input_shape))["params"]


def _params(model: nn.Module, input_shape, seed: int = 0) -> dict:
    """Real parameter values without compiling the initialisers: numpy normals / sqrt(fan_in)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: jnp.asarray(rng.normal(0.0, math.prod(a.shape[:-1]) ** -0.5, a.shape), a.dtype),
        _param_shapes(model, input_shape),
    )


def _input(shape, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# --------------------------------------------------------------------------- registry


def test_registry():
    assert BACKBONES == {"unet": UNet, "vnet": VNet, "fcn": FCN}
    model = get_backbone("vnet", num_classes=3, spatial_dims=2, features=TINY)
    assert isinstance(model, VNet) and model.num_classes == 3 and model.features == TINY
    with pytest.raises(
        ValueError, match=re.escape("unknown backbone 'UNet'; valid names: unet, vnet, fcn")
    ):
        get_backbone("UNet", num_classes=2)


def test_count_params():
    tree = {"a": {"kernel": jnp.zeros((3, 3, 2, 4))}, "b": jax.ShapeDtypeStruct((5,), jnp.float32)}
    assert count_params(tree) == 3 * 3 * 2 * 4 + 5
    assert count_params({}) == 0


# --------------------------------------------------------------------------- shapes

SHAPES = [
    # (class, spatial_dims, input shape, expected logits shape) with num_classes=3, TINY.
    (UNet, 2, (2, 32, 16, 2), (2, 32, 16, 3)),
    (UNet, 3, (1, 16, 8, 24, 1), (1, 16, 8, 24, 3)),
    (VNet, 2, (2, 32, 16, 2), (2, 32, 16, 3)),
    (VNet, 3, (1, 16, 8, 24, 1), (1, 16, 8, 24, 3)),
    (FCN, 2, (2, 32, 16, 2), (2, 32, 16, 3)),
    (FCN, 3, (1, 16, 8, 24, 1), (1, 16, 8, 24, 3)),
]


@pytest.mark.parametrize("upsample", ["transpose", "resize"])
@pytest.mark.parametrize(("cls", "spatial_dims", "in_shape", "out_shape"), SHAPES)
def test_output_shapes(cls, spatial_dims, in_shape, out_shape, upsample):
    model = cls(3, spatial_dims=spatial_dims, features=TINY, upsample=upsample)
    variables = {"params": _param_shapes(model, in_shape)}
    logits, aux = jax.eval_shape(model.apply, variables, _abstract(in_shape))
    assert logits.shape == out_shape
    assert set(aux) == {"bottleneck", "pre_logits"}
    spatial = in_shape[1:-1]
    assert aux["bottleneck"].shape == (in_shape[0], *(s // 8 for s in spatial), TINY[-1])
    pre = {
        UNet: (in_shape[0], *spatial, TINY[0]),
        VNet: (in_shape[0], *spatial, 2 * TINY[0]),
        FCN: (in_shape[0], *(s // 2 for s in spatial), 3),
    }[cls]
    assert aux["pre_logits"].shape == pre


@pytest.mark.parametrize("cls", CLASSES)
def test_forward_runs_and_is_finite_3d(cls):
    in_shape = (1, 16, 16, 8, 2)
    model = cls(2, spatial_dims=3, features=TINY)
    logits, aux = jax.jit(model.apply)({"params": _params(model, in_shape)}, _input(in_shape))
    assert logits.shape == (1, 16, 16, 8, 2)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in (logits, *aux.values()))


def test_depth_follows_features():
    # Five levels: depth 4, so 16 | every spatial size; VNet with 3 entries has depth 2.
    model = UNet(2, spatial_dims=2, features=(4, 4, 8, 8, 16))
    assert model.depth == 4
    logits, aux = jax.eval_shape(
        model.apply, {"params": _param_shapes(model, (1, 32, 16, 1))}, _abstract((1, 32, 16, 1))
    )
    assert logits.shape == (1, 32, 16, 2) and aux["bottleneck"].shape == (1, 2, 1, 16)
    assert VNet(2, spatial_dims=2, features=(4, 8, 16)).depth == 2
    params = _param_shapes(FCN(2, spatial_dims=2, features=(4, 8, 8, 16, 16)), (1, 16, 16, 1))
    assert {k for k in params if k.startswith("score_")} == {f"score_{i}" for i in range(1, 5)}


# --------------------------------------------------------------------------- parameter counts

# Default (paper-size) features, 1 input channel (one modality), 2 classes; default upsample.
PINNED = {
    ("unet", 2): 1_712_816,
    ("unet", 3): 5_073_872,
    ("vnet", 2): 5_027_080,
    ("vnet", 3): 14_689_832,
    ("fcn", 2): 688_774,
    ("fcn", 3): 2_043_862,
}


@pytest.mark.parametrize(("name", "spatial_dims"), sorted(PINNED))
def test_pinned_param_counts(name, spatial_dims):
    model = get_backbone(name, num_classes=2, spatial_dims=spatial_dims)
    shapes = _param_shapes(model, (1, *(16,) * spatial_dims, 1))
    assert count_params(shapes) == PINNED[(name, spatial_dims)]


def _unet_hand_count(d: int, c_in: int, n_cls: int, f, short: bool, upsample: str) -> int:
    """Sum of k**d * c_in * c_out over the U-Net's convs, from the architecture description."""
    conv = lambda k, a, b: k**d * a * b  # noqa: E731
    n = conv(3, c_in, f[0])  # init
    for lo, hi in itertools.pairwise(f):
        n += conv(3, lo, hi) + conv(3, hi, hi) + conv(1, lo, hi)  # strided block + shortcut
        n += 2 * conv(3, hi, hi)  # non-downsampling block, identity shortcut
    if not short:
        n += 3 * 2 * conv(3, f[-1], f[-1])  # bottleneck_1..3
    for lo, hi in itertools.pairwise(f):
        # 1x1 conv (+ resize), or the kernel-2 stride-2 transposed conv (2**d * c_in * c_out).
        n += conv(1, hi, lo) if upsample == "resize" else conv(2, hi, lo)
        n += 2 * conv(3, lo, lo)
    return n + conv(1, f[0], n_cls)  # head, no bias


@pytest.mark.parametrize("upsample", ["transpose", "resize"])
@pytest.mark.parametrize(
    ("short", "features"), [(False, (16, 32, 64, 128)), (True, (16, 32, 32, 64))]
)
def test_unet_3d_count_matches_hand_formula(short, features, upsample):
    model = UNet(2, spatial_dims=3, features=features, short=short, upsample=upsample)
    got = count_params(_param_shapes(model, (1, 16, 16, 16, 1)))
    assert got == _unet_hand_count(3, 1, 2, features, short, upsample)
    if not short and upsample == "transpose":
        assert got == PINNED[("unet", 3)]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spatial_dims": 1}, "spatial_dims must be 2 or 3, got 1"),
        ({"spatial_dims": 4}, "spatial_dims must be 2 or 3, got 4"),
        ({"spatial_dims": True}, "spatial_dims must be 2 or 3, got True"),
        ({"features": ()}, "features must be a non-empty sequence of positive ints, got ()"),
        ({"features": (4, -8)}, "features must be a non-empty sequence of positive ints, got (4, -8)"),
        ({"features": (4, 0)}, "features must be a non-empty sequence of positive ints, got (4, 0)"),
        ({"features": (4, 8.0)}, "features must be a non-empty sequence of positive ints, got (4, 8.0)"),
        ({"features": "48"}, "features must be a non-empty sequence of positive ints, got '48'"),
        ({"features": (4,)}, "features needs at least 2 entries (one channel count per resolution level), got (4,)"),
        ({"num_classes": 0}, "num_classes must be an int >= 1, got 0"),
        ({"num_classes": 2.0}, "num_classes must be an int >= 1, got 2.0"),
        ({"dropout_rate": -0.1}, "dropout_rate must be in [0, 1), got -0.1"),
        ({"dropout_rate": 1.0}, "dropout_rate must be in [0, 1), got 1.0"),
        ({"upsample": "nearest"}, "upsample must be one of ('resize', 'transpose'), got 'nearest'"),
    ],
)  # fmt: skip
def test_bad_hyperparameters(cls, kwargs, message):
    kwargs = {"num_classes": 2, "spatial_dims": 3, "features": TINY, **kwargs}
    with pytest.raises(ValueError, match=re.escape(f"{cls.__name__}: {message}")):
        cls(**kwargs)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize(
    ("spatial_dims", "shape", "message"),
    [
        (3, (1, 16, 12, 16, 1), "spatial dims must be multiples of 2**depth = 8 (depth 3), got spatial shape (16, 12, 16) in input shape (1, 16, 12, 16, 1)"),
        (2, (2, 20, 16, 1), "spatial dims must be multiples of 2**depth = 8 (depth 3), got spatial shape (20, 16) in input shape (2, 20, 16, 1)"),
        (3, (16, 16, 16, 1), "expected a batched channels-last input [B, H, W, D, C] of rank 5 for spatial_dims=3, got shape (16, 16, 16, 1)"),
        (2, (1, 16, 16, 16, 1), "expected a batched channels-last input [B, H, W, C] of rank 4 for spatial_dims=2, got shape (1, 16, 16, 16, 1)"),
    ],
)  # fmt: skip
def test_bad_input_shapes(cls, spatial_dims, shape, message):
    model = cls(2, spatial_dims=spatial_dims, features=TINY)
    with pytest.raises(ValueError, match=re.escape(f"{cls.__name__}: {message}")):
        jax.eval_shape(model.init, jax.random.key(0), _abstract(shape))


def test_unknown_backbone_kwargs_fail():
    with pytest.raises(TypeError):
        get_backbone("unet", num_classes=2, depth=3)


# --------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("cls", CLASSES)
def test_dropout(cls, getkey):
    in_shape = (1, 16, 16, 1)
    model = cls(2, spatial_dims=2, features=TINY, dropout_rate=0.5)
    variables = {"params": _params(model, in_shape)}
    x = _input(in_shape)

    @jax.jit
    def run(key, train_key):
        stochastic = model.apply(variables, x, train=True, rngs={"dropout": key})[0]
        again = model.apply(variables, x, train=True, rngs={"dropout": key})[0]
        other = model.apply(variables, x, train=True, rngs={"dropout": train_key})[0]
        det = model.apply(variables, x, train=False)[0]
        no_dropout = model.clone(dropout_rate=0.0).apply(variables, x)[0]
        return stochastic, again, other, det, no_dropout

    stochastic, again, other, det, no_dropout = run(getkey(), getkey())
    np.testing.assert_array_equal(stochastic, again)
    assert not np.allclose(stochastic, other)
    assert not np.allclose(stochastic, det)
    np.testing.assert_array_equal(det, no_dropout)


def test_dropout_needs_rng_when_training():
    model = UNet(2, spatial_dims=2, features=TINY, dropout_rate=0.5)
    shape = (1, 16, 16, 1)
    variables = {"params": _param_shapes(model, shape)}
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=True), variables, _abstract(shape))


# --------------------------------------------------------------------------- conv layout


def _conv_calls(model: nn.Module, shape) -> dict[tuple[str, ...], nn.Conv]:
    """Every `nn.Conv.__call__` made while tracing `init`, keyed by module path."""
    calls = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Conv) and context.method_name == "__call__":
            calls[context.module.path] = context.module
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(model.init, jax.random.key(0), _abstract(shape))
    return calls


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("cls", CLASSES)
def test_conv_layout(cls, spatial_dims):
    shape = (1, *(8,) * spatial_dims, 2)
    model = cls(2, spatial_dims=spatial_dims, features=TINY)
    flat = flatten_dict(_param_shapes(model, shape))
    calls = _conv_calls(model, shape)
    kernels = {path[:-1]: leaf for path, leaf in flat.items() if path[-1] == "kernel"}
    # Every kernel belongs to an nn.Conv that the interceptor sees, and vice versa.
    assert set(kernels) == set(calls)
    # Every other parameter is a conv bias or a PReLU slope.
    for path in flat:
        assert path[-1] in ("kernel", "bias", "negative_slope"), path
    three = {p for p, k in kernels.items() if k.shape[:-2] == (3,) * spatial_dims}
    assert three, "no 3x3 convs found"
    for path in three:
        assert (*path, "bias") not in flat, f"3x3 conv {path} has a bias"
        assert calls[path].kernel_size == (3,) * spatial_dims
    if cls is UNet:
        assert not any(p[-1] == "bias" for p in flat), "the paper's U-Net has no biases"
    for module in calls.values():
        assert module.conv_general_dilated is DEFAULT_CONV


def test_unet_param_paths():
    model = UNet(2, spatial_dims=3, features=TINY)
    flat = flatten_dict(_param_shapes(model, (1, 8, 8, 8, 1)))
    modules = sorted({path[0] for path in flat})
    expected = ["init", "head"] + [f"down_{i}" for i in range(1, 7)]
    expected += [f"bottleneck_{j}" for j in (1, 2, 3)] + [f"up_{k}" for k in (1, 2, 3)]
    assert modules == sorted(expected)
    assert flat[("down_1", "conv_1", "kernel")].shape == (3, 3, 3, 4, 8)
    assert flat[("down_1", "shortcut", "kernel")].shape == (1, 1, 1, 4, 8)
    assert ("down_2", "shortcut", "kernel") not in flat  # identity shortcut
    assert flat[("up_1", "upsample", "kernel")].shape == (1, 1, 1, 16, 8 * 8)
    assert flat[("head", "kernel")].shape == (1, 1, 1, 4, 2)
    short = flatten_dict(_param_shapes(model.clone(short=True), (1, 8, 8, 8, 1)))
    assert not any(p[0].startswith("bottleneck") for p in short)


def test_interceptor_recipe_for_bayesian_convs():
    """The recipe a variational layer can use: intercept `nn.Conv.__call__`, pick 3x3 convs
    by kernel size (or path), and compute the conv itself with a substituted kernel."""
    model = UNet(2, spatial_dims=2, features=TINY)
    shape = (1, 16, 16, 1)
    variables, x = {"params": _params(model, shape)}, _input(shape)
    seen = []

    def substitute(scale):
        def interceptor(next_fun, args, kwargs, context):
            conv = context.module
            if not (isinstance(conv, nn.Conv) and context.method_name == "__call__"):
                return next_fun(*args, **kwargs)
            if conv.kernel_size != (3, 3):
                return next_fun(*args, **kwargs)
            seen.append(conv.path)
            (inputs,) = args
            kernel = scale * conv.variables["params"]["kernel"]
            dn = lax.conv_dimension_numbers(inputs.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
            return conv.conv_general_dilated(
                inputs, kernel, conv.strides, conv.padding, dimension_numbers=dn
            )

        return interceptor

    @jax.jit
    def run(variables, x):
        plain = model.apply(variables, x)[0]
        with nn.intercept_methods(substitute(1.0)):
            same = model.apply(variables, x)[0]
        with nn.intercept_methods(substitute(0.5)):
            halved = model.apply(variables, x)[0]
        return plain, same, halved

    plain, same, halved = run(variables, x)
    np.testing.assert_allclose(same, plain, atol=1e-5)
    assert not np.allclose(halved, plain)
    assert ("init",) in seen and ("down_1", "conv_1") in seen and ("up_3", "conv_2") in seen
    assert not any(p[-1] in ("shortcut", "upsample", "head") for p in seen)


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize(
    ("x_shape", "k_shape", "strides", "padding"),
    [
        ((2, 8, 6, 10, 3), (3, 3, 3, 3, 4), (2, 2, 2), ((1, 1),) * 3),
        ((1, 9, 8, 7, 3), (3, 3, 3, 3, 4), (2, 2, 2), "SAME"),
        ((1, 8, 6, 10, 3), (1, 1, 1, 3, 4), (2, 2, 2), ((0, 0),) * 3),
        ((1, 8, 8, 8, 3), (2, 2, 2, 3, 4), (2, 2, 2), "VALID"),
        ((1, 8, 8, 8, 3), (3, 3, 3, 3, 4), (2, 1, 2), ((1, 1),) * 3),
        ((2, 8, 8, 3), (3, 3, 3, 4), (2, 2), ((1, 1),) * 2),
    ],
)
def test_conv_general_dilated_matches_lax(x_shape, k_shape, strides, padding):
    x, w = _input(x_shape, 1), _input(k_shape, 2)
    dn = ("NHWC", "HWIO", "NHWC") if len(x_shape) == 4 else ("NDHWC", "DHWIO", "NDHWC")

    def loss(conv, x, w):
        y = conv(x, w, strides, padding, dimension_numbers=dn)
        return jnp.sum(jnp.sin(y)), y

    (_, y_ref), g_ref = jax.value_and_grad(
        lambda x, w: loss(lax.conv_general_dilated, x, w), (0, 1), has_aux=True
    )(x, w)
    (_, y), g = jax.value_and_grad(lambda x, w: loss(DEFAULT_CONV, x, w), (0, 1), has_aux=True)(
        x, w
    )
    np.testing.assert_allclose(y, y_ref, atol=1e-4, rtol=1e-5)
    for a, b in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_transpose_upsampling_is_a_transposed_conv(spatial_dims):
    d = spatial_dims
    x = _input((2, *(3,) * d, 4))

    class Up(nn.Module):
        @nn.compact
        def __call__(self, x):
            return upsample2x(x, features=5, mode="transpose", spatial_dims=d, name="upsample")

    ct = nn.ConvTranspose(5, (2,) * d, strides=(2,) * d, padding="VALID", use_bias=False)
    w = _input((*(2,) * d, 4, 5), 3)
    y_ref = ct.apply({"params": {"kernel": w}}, x)
    # flax's ConvTranspose does not flip the kernel; depth-to-space reads it flipped.
    flipped = jnp.flip(w, axis=tuple(range(d)))
    k1 = jnp.moveaxis(flipped, d, 0).reshape((1,) * d + (4, 5 * 2**d))
    y = Up().apply({"params": {"upsample": {"kernel": k1}}}, x)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    assert depth_to_space(jnp.zeros((1, 2, 3, 8 * 2**d)), 2).shape == (1, 4, 6, 8 * 2 ** (d - 2))


def test_resize_upsampling_is_linear_half_pixel():
    x = jnp.arange(4.0).reshape(1, 4, 1, 1) * jnp.ones((1, 1, 2, 1))

    class Up(nn.Module):
        @nn.compact
        def __call__(self, x):
            return upsample2x(x, features=None, mode="resize", spatial_dims=2, name="u")

    y = Up().apply({}, x)[0, :, 0, 0]
    np.testing.assert_allclose(y, [0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0], atol=1e-6)


def test_fcn_transpose_upsampling_starts_as_replication():
    model = FCN(3, spatial_dims=2, features=(4, 8))
    x = _input((1, 8, 8, 1))
    params = _params(model, x.shape)
    # Use the module's own initialiser for the upsampling kernel.
    real = jax.jit(model.init)(jax.random.key(0), x)["params"]
    params = {**params, "up_1": real["up_1"]}
    logits, aux = jax.jit(model.apply)({"params": params}, x)
    expected = jnp.repeat(jnp.repeat(aux["pre_logits"], 2, axis=1), 2, axis=2)
    np.testing.assert_allclose(logits, expected, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 6, 4, 3), (2, 4, 6, 2, 3)])
def test_instance_norm_matches_flax(shape):
    x = 3.0 + 2.0 * _input(shape)
    ref = nn.InstanceNorm(epsilon=1e-5, use_scale=False, use_bias=False).apply({}, x)
    np.testing.assert_allclose(instance_norm(x), ref, atol=1e-5)
    assert instance_norm(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("shape", [(2, 6, 4, 3), (2, 4, 6, 2, 3)])
def test_instance_norm_gradient_matches_flax(shape):
    x = 3.0 + 2.0 * _input(shape)
    cotangent = _input(shape, seed=1)
    norm = nn.InstanceNorm(epsilon=1e-5, use_scale=False, use_bias=False)
    (expected,) = jax.vjp(lambda v: norm.apply({}, v), x)[1](cotangent)
    (ours,) = jax.vjp(instance_norm, x)[1](cotangent)
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    (batched,) = jax.vmap(lambda v, g: jax.vjp(instance_norm, v)[1](g))(x[None], cotangent[None])
    np.testing.assert_allclose(batched[0], expected, atol=1e-5)


@pytest.mark.parametrize("cls", CLASSES)
def test_bfloat16_compute_dtype(cls):
    # Strict dtype promotion (conftest): every cast must be explicit.
    model = cls(2, spatial_dims=3, features=TINY, dtype=jnp.bfloat16)
    shape = (1, 8, 8, 8, 1)
    params = _param_shapes(model, shape)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    logits, aux = jax.eval_shape(model.apply, {"params": params}, _abstract(shape))
    assert logits.dtype == jnp.bfloat16 and aux["pre_logits"].dtype == jnp.bfloat16


# --------------------------------------------------------------------------- jit


def test_jit_grad_step():
    model = UNet(2, spatial_dims=3, features=TINY)
    shape = (1, 8, 8, 8, 1)
    params, x = _params(model, shape), _input(shape)
    labels = jnp.zeros(shape[:-1], jnp.int32)

    @jax.jit
    def step(params):
        def loss(p):
            logits, _ = model.apply({"params": p}, x, train=True)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1))

        value, grads = jax.value_and_grad(loss)(params)
        return value, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    value, new_params = step(params)
    assert jnp.isfinite(value)
    assert jax.tree.structure(new_params) == jax.tree.structure(params)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(new_params))
    value2, _ = step(new_params)
    assert value2 < value


class PlainNet(Backbone):
    """The recipe's example backbone: two 3×3 convolutions and a 1×1 head."""

    @nn.compact
    def _segment(self, x, *, train):
        d = self.spatial_dims
        x = nn.relu(conv3(self.features[0], d, name="conv_a", conv=self.conv)(x))
        x = nn.relu(conv3(self.features[1], d, name="conv_b", conv=self.conv)(x))
        logits = conv1(self.num_classes, d, use_bias=True, name="head", conv=self.conv)(x)
        return logits, {"bottleneck": x, "pre_logits": x}


def test_a_new_backbone_plugs_in_by_subclass_and_registry_entry(monkeypatch):
    from vi_seg_jax.train.build import build_spec
    from vi_seg_jax.train.config import BackboneConfig, DataConfig, TrainConfig
    from vi_seg_jax.train.state import create_train_state
    from vi_seg_jax.train.step import make_train_step

    monkeypatch.setitem(BACKBONES, "plain", PlainNet)
    config = TrainConfig(
        backbone=BackboneConfig(name="plain", spatial_dims=2, features=(4, 4)),
        data=DataConfig(patch_shape=(8, 8)),
    )
    spec = build_spec(config, num_data=1.0)
    images = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    labels = (images[..., 0] > 0).astype(jnp.uint8)
    state = create_train_state(jax.random.key(1), spec, images)
    # Its two 3×3 kernels are the Bayesian ones; the head stays deterministic.
    assert sorted(state.guide.loc) == ["conv_a", "conv_b"] and "head" in state.params
    with jax.numpy_dtype_promotion("standard"):
        state, metrics = make_train_step(spec)(state, (images, labels))
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1
    with pytest.raises(ValueError, match=r"multiples of 2\*\*depth"):
        PlainNet(num_classes=2, spatial_dims=2, features=(4, 4)).init(
            jax.random.key(0), jnp.zeros((1, 7, 8, 4))
        )
