"""Blocks and checks shared by the backbones (`unet.py`, `vnet.py`, `fcn.py`).

Every convolution here is an `nn.Conv` submodule with an explicit name, so that a variational
layer can intercept `nn.Conv.__call__` (`flax.linen.intercept_methods`) and pick the Bayesian
convolutions by parameter path or by kernel shape: 3×3(×3) convolutions never have a bias
(their only parameter is `kernel`, shape `(3,) * spatial_dims + (c_in, c_out)`); 1×1(×1)
projection, upsampling and output convolutions (and V-Net's 2×2(×2) strided ones) are the
deterministic part by default (method.md §2).

Normalisation is instance norm without affine parameters (the paper code's
`nn.InstanceNorm3d` defaults, eps 1e-5), a parameter-free function: no BatchNorm, so
nothing mixes statistics across Monte Carlo samples and there is no `batch_stats` collection.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Upsample = Literal["resize", "transpose"]
UPSAMPLE_MODES: tuple[str, ...] = ("resize", "transpose")

# torch.nn.InstanceNorm3d's default epsilon (the paper code's normalisation).
NORM_EPSILON = 1e-5


# --------------------------------------------------------------------------- validation


def check_hyperparameters(
    cls_name: str,
    *,
    spatial_dims: Any,
    features: Any,
    num_classes: Any,
    dropout_rate: Any,
    upsample: Any,
    min_levels: int,
) -> tuple[int, ...]:
    """Validates the hyperparameters every backbone shares; returns `features` as a tuple.

    Raises:
      ValueError: with a message naming the class, the attribute and the offending value.
    """
    if isinstance(spatial_dims, bool) or spatial_dims not in (2, 3):
        raise ValueError(f"{cls_name}: spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if (
        isinstance(features, str | bytes)
        or not isinstance(features, Sequence)
        or len(features) == 0
        or not all(
            isinstance(f, int | np.integer) and not isinstance(f, bool) and f > 0 for f in features
        )
    ):
        raise ValueError(
            f"{cls_name}: features must be a non-empty sequence of positive ints, got {features!r}"
        )
    if len(features) < min_levels:
        raise ValueError(
            f"{cls_name}: features needs at least {min_levels} entries (one channel count per "
            f"resolution level), got {tuple(features)!r}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise ValueError(f"{cls_name}: num_classes must be an int >= 1, got {num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"{cls_name}: num_classes must be an int >= 1, got {num_classes!r}")
    if (
        isinstance(dropout_rate, bool)
        or not isinstance(dropout_rate, int | float | np.floating)
        or not 0.0 <= dropout_rate < 1.0
    ):
        raise ValueError(f"{cls_name}: dropout_rate must be in [0, 1), got {dropout_rate!r}")
    if upsample not in UPSAMPLE_MODES:
        raise ValueError(
            f"{cls_name}: upsample must be one of {UPSAMPLE_MODES!r}, got {upsample!r}"
        )
    return tuple(int(f) for f in features)


def check_input(cls_name: str, x: jax.Array, *, spatial_dims: int, depth: int) -> None:
    """Checks a batched channels-last input against the backbone's input-size rule.

    The rule: `x.shape == (B, *spatial, C)` with `len(spatial) == spatial_dims` and every
    spatial size a positive multiple of `2**depth`.

    Raises:
      ValueError: wrong rank, or a spatial size that is not a multiple of `2**depth`.
    """
    shape = tuple(x.shape)
    layout = "[B, H, W, C]" if spatial_dims == 2 else "[B, H, W, D, C]"
    if len(shape) != spatial_dims + 2:
        raise ValueError(
            f"{cls_name}: expected a batched channels-last input {layout} of rank "
            f"{spatial_dims + 2} for spatial_dims={spatial_dims}, got shape {shape}"
        )
    multiple = 2**depth
    spatial = shape[1:-1]
    if any(s <= 0 or s % multiple for s in spatial):
        raise ValueError(
            f"{cls_name}: spatial dims must be multiples of 2**depth = {multiple} "
            f"(depth {depth}), got spatial shape {spatial} in input shape {shape}"
        )


# --------------------------------------------------------------------------- layers


ConvImpl = Literal["auto", "lax", "s2d", "stacked", "summed", "gemm", "fold", "fold_stacked"]
CONV_IMPLS: tuple[str, ...] = (
    "auto",
    "lax",
    "s2d",
    "stacked",
    "summed",
    "gemm",
    "fold",
    "fold_stacked",
)

# The implementation `conv_general_dilated` uses, read at trace time (see `conv_impl`).
_CONV_IMPL: list[str] = ["auto"]

# "auto" (measured per layer in the 3D U-Net's LRT step, see `_auto_impl`): the 2D convs
# stack the depth taps into the channels while `K0 * C_in` is at most this, ...
STACK_MAX_CHANNELS = 24
# ... and the kernel gradient is one GEMM for convs with at least this many output voxels
# (batch included) or with 2-tap kernels (the strided rewrite's), XLA's conv otherwise.
GEMM_GRAD_MIN_VOXELS = 2 * 48**3


def active_conv_impl() -> str:
    """The `conv_impl` choice in effect (innermost block), `"auto"` outside any block."""
    return _CONV_IMPL[0]


@contextlib.contextmanager
def conv_impl(impl: ConvImpl):
    """Selects how `conv_general_dilated` computes 3D convs while tracing inside the block.

    For benchmarks and tests; every choice is exact (equal to `lax.conv_general_dilated` in
    values and gradients up to float rounding). All but `"lax"` apply the strided rewrite
    (space-to-depth, see `conv_general_dilated`) first; they differ in the stride-1 conv:
      `"auto"` (default): per conv, by the rule `_auto_impl` measured on CPU; on other
        backends `"s2d"`.
      `"lax"`: plain `lax.conv_general_dilated` everywhere.
      `"s2d"`: XLA's 3D conv (the implementation before the 2D/GEMM forms).
      `"stacked"` / `"summed"`: 2D convs over the first spatial axis's shifted slices folded
        into the batch, stacked along channels (one conv) or summed (one conv per tap);
        autodiff gives 2D-conv gradients.
      `"fold"` / `"fold_stacked"`: `"summed"` / `"stacked"` with the kernel gradient as one
        GEMM (`_kernel_grad`) instead of XLA's (transposing) kernel-gradient conv.
      `"gemm"`: the GEMM form on the flattened padded grid (`_conv3d_gemm`), custom VJP.
    1×1×1 kernels use the GEMM form under every choice but `"lax"` and `"s2d"`.

    "auto" is tuned for kernels shared by the whole batch (LRT, MAP). When a step vmaps
    over per-particle kernels (`estimator="full"`), XLA turns the 2D convs into grouped
    convs; there `"gemm"` (batched GEMMs) measured 4.7× faster than `"s2d"` and "auto"
    0.9× (2 particles, 2×32³): `make_train_step` traces such steps (and the ensemble's)
    inside `conv_impl("gemm")` when the active choice is "auto".

    The choice is read when a function is traced: jit a fresh function inside the block.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv impl must be one of {CONV_IMPLS!r}, got {impl!r}")
    previous = _CONV_IMPL[0]
    _CONV_IMPL[0] = impl
    try:
        yield
    finally:
        _CONV_IMPL[0] = previous


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """`lax.conv_general_dilated` with fast, exact paths for 3D channels-last convs.

    Every backbone conv passes this to `nn.Conv(conv_general_dilated=...)`; the kernel
    parameter and its shape are unchanged. 2D convs, and any 3D conv that is not
    channels-last without dilation or groups, go straight to XLA. XLA's CPU 3D convolution
    is slow (12-18 GFLOP/s forward+backward on a 2-core Zen 4 at the U-Net's sizes, 3 GFLOP/s
    with 4 input channels) while its 2D convolution is fast, so 3D convs are rewritten:

    1. Strided (stride > 1). XLA's CPU backward pass of a strided 3D conv (an input-dilated
       conv, the same slow path as jax issue #31662) is 10-60× slower than the forward pass,
       so it becomes a stride-1 conv:
       - a 1×1(×1) kernel: subsample the (padded) input, then a stride-1 conv;
       - a kernel `K` with stride `s`: pad/crop the input to `s * (n_out + Q - 1)` per axis,
         `Q = ceil(K / s)`, space-to-depth by `s`, and a stride-1 VALID conv with the kernel
         zero-padded to `Q * s` and rearranged to `(Q,) * d + (s**d * C_in, C_out)`; its
         forward pass costs `(Q * s / K)**d` times the strided conv's FLOPs (2.4× for a
         3×3×3 stride-2 conv), and forward+backward is 6-19× faster on CPU.
    2. Stride 1 (`_auto_impl` picks per conv; `conv_impl` forces one):
       - "summed"/"stacked": the first spatial axis is padded, its `K0` shifted slices are
         folded into the batch, and the conv becomes 2D convolutions over the other two
         axes (XLA:CPU runs 2D convs 3-4× faster than 3D ones): the sum of `K0` convs with
         the kernel slices `w[k]`, or one conv on the slices stacked along channels with a
         `(K1, K2, K0 * C_in, C_out)` kernel (better for few input channels);
       - "fold": "summed" forward and input gradient, but the kernel gradient as one GEMM
         on the flattened padded grid (`_kernel_grad`): XLA's kernel-gradient conv copies
         its operands transposed (batch-minor), which at 2×64³ costs more than the conv;
       - "gemm" (and every 1×1×1 kernel): the conv itself as one GEMM plus a shifted sum on
         the flattened padded grid, with a custom VJP of GEMMs (`_conv3d_gemm`).
       `_auto_impl`: "fold" for convs with >= 2·48³ output voxels or 2-tap kernels (the
       strided rewrite's), "gemm" when those have `K0 * C_in <= 24` (the 4-channel input
       conv), "summed" (or "stacked" for few channels) for the small levels.

    Measured (2-core AMD EPYC Zen 4, jax 0.10.2, `benchmarks/train_step.py` defaults: the
    paper's 3D U-Net, LRT, 2×4×64³; a shared machine, so interleaved ratios): "auto" is
    2.4-2.8× faster per training step than "s2d" (5.4 s vs 14.2 s on a quiet machine),
    1.07-1.2× faster than "summed" and 1.1× than "stacked" everywhere, 1.05× than "gemm";
    per layer (forward+backward of LRT's two convs) "fold" beats "summed" 1.3-1.4× at
    64³×16 and 1.3-1.7× on the strided rewrite's 2-tap convs, "gemm" 2× on the 4-channel
    input conv, while "summed" wins at 32³ and below. Values and gradients are checked
    against `lax.conv_general_dilated` in `tests/backbones/test_conv_impl.py`.

    A variational layer replacing `nn.Conv.__call__` should call this function (it is the
    module's `conv_general_dilated` attribute) with the module's strides and padding.
    """
    nd = lhs.ndim
    d = nd - 2
    impl = _CONV_IMPL[0]
    if impl == "auto" and jax.default_backend() != "cpu":
        impl = "s2d"  # measured on CPU only; accelerators keep their own 3D convs
    strides = tuple(int(s) for s in window_strides)
    channels_last = _channels_last(nd)
    fast = (
        impl != "lax"
        and d == 3
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == channels_last
        and all(v == 1 for v in (lhs_dilation or (1,) * d))
        and all(v == 1 for v in (rhs_dilation or (1,) * d))
        and feature_group_count == 1
        and batch_group_count == 1
    )
    if not fast:
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
    spatial = lhs.shape[1:-1]
    ksize = rhs.shape[:-2]
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(spatial, ksize, strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    conv = dict(precision=precision, preferred_element_type=preferred_element_type)
    if all(s == 1 for s in strides):
        return _conv3d_stride1(lhs, rhs, pads, impl, **conv)
    n_out = tuple(
        (n + lo + hi - k) // s + 1
        for n, (lo, hi), k, s in zip(spatial, pads, ksize, strides, strict=True)
    )
    zero = jnp.zeros((), lhs.dtype)
    if all(k == 1 for k in ksize):
        x = lax.pad(lhs, zero, [(0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0)])
        x = lax.slice(
            x,
            (0,) * nd,
            (
                x.shape[0],
                *(s * (m - 1) + 1 for s, m in zip(strides, n_out, strict=True)),
                x.shape[-1],
            ),
            (1, *strides, 1),
        )
        return _conv3d_stride1(x, rhs, ((0, 0),) * d, impl, **conv)
    q = tuple(-(-k // s) for k, s in zip(ksize, strides, strict=True))
    # Pad (or crop, with a negative high pad) every axis to s * (n_out + q - 1).
    hi_pads = tuple(
        s * (m + qq - 1) - n - lo
        for s, m, qq, n, (lo, _) in zip(strides, n_out, q, spatial, pads, strict=True)
    )
    x = lax.pad(
        lhs,
        zero,
        [(0, 0, 0), *((lo, hi, 0) for (lo, _), hi in zip(pads, hi_pads, strict=True)), (0, 0, 0)],
    )
    b, c = x.shape[0], x.shape[-1]
    blocks = tuple(n // s for n, s in zip(x.shape[1:-1], strides, strict=True))
    x = x.reshape(b, *(v for m, s in zip(blocks, strides, strict=True) for v in (m, s)), c)
    x = jnp.transpose(x, (0, *range(1, 2 * d, 2), *range(2, 2 * d + 1, 2), 2 * d + 1))
    x = x.reshape(b, *blocks, int(np.prod(strides)) * c)
    o = rhs.shape[-1]
    w = jnp.pad(
        rhs,
        [*((0, qq * s - k) for qq, s, k in zip(q, strides, ksize, strict=True)), (0, 0), (0, 0)],
    )
    w = w.reshape(*(v for qq, s in zip(q, strides, strict=True) for v in (qq, s)), c, o)
    w = jnp.transpose(w, (*range(0, 2 * d, 2), *range(1, 2 * d, 2), 2 * d, 2 * d + 1))
    w = w.reshape(*q, int(np.prod(strides)) * c, o)
    return _conv3d_stride1(x, w, ((0, 0),) * d, impl, **conv)


def _channels_last(nd: int) -> lax.ConvDimensionNumbers:
    """Dimension numbers of a channels-last conv of rank `nd` (NHWC / HWIO / NHWC)."""
    return lax.ConvDimensionNumbers(
        (0, nd - 1, *range(1, nd - 1)),
        (nd - 1, nd - 2, *range(nd - 2)),
        (0, nd - 1, *range(1, nd - 1)),
    )


def _conv3d_stride1(
    x: jax.Array,
    w: jax.Array,
    pads: tuple[tuple[int, int], ...],
    impl: str,
    *,
    precision: Any,
    preferred_element_type: Any,
) -> jax.Array:
    """A stride-1, channels-last 3D conv `[B, N0, N1, N2, C] * [K0, K1, K2, C, O]`."""
    kw = dict(precision=precision, preferred_element_type=preferred_element_type)
    if impl == "s2d":
        return lax.conv_general_dilated(
            x, w, (1, 1, 1), pads, dimension_numbers=_channels_last(5), **kw
        )
    if all(k == 1 for k in w.shape[:3]):  # a matrix product per voxel
        return _conv3d_gemm(x, w, pads, precision, preferred_element_type)
    if impl == "auto":
        impl = _auto_impl(x.shape, w.shape, pads)
    if impl == "gemm":
        return _conv3d_gemm(x, w, pads, precision, preferred_element_type)
    if w.shape[0] == 1:
        return lax.conv_general_dilated(
            x, w, (1, 1, 1), pads, dimension_numbers=_channels_last(5), **kw
        )
    if impl in ("fold", "fold_stacked"):
        return _conv3d_fold_gemm_wgrad(
            x, w, pads, impl == "fold_stacked", precision, preferred_element_type
        )
    return _conv3d_fold(x, w, pads, stacked=impl == "stacked", **kw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv3d_fold_gemm_wgrad(x, w, pads, stacked, precision, preferred_element_type):
    """`_conv3d_fold` whose kernel gradient is one GEMM (`_kernel_grad_gemm`)."""
    return _conv3d_fold(
        x,
        w,
        pads,
        stacked=stacked,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


def _fold_fwd(x, w, pads, stacked, precision, preferred_element_type):
    y = _conv3d_fold_gemm_wgrad(x, w, pads, stacked, precision, preferred_element_type)
    return y, (x, w)


def _fold_bwd(pads, stacked, precision, preferred_element_type, res, dy):
    x, w = res
    _, x_vjp = jax.vjp(
        lambda x: _conv3d_fold(
            x,
            w,
            pads,
            stacked=stacked,
            precision=precision,
            preferred_element_type=preferred_element_type,
        ),
        x,
    )
    (dx,) = x_vjp(dy)
    dw = _kernel_grad_gemm(x, dy, w.shape, pads, precision).astype(w.dtype)
    return dx, dw


_conv3d_fold_gemm_wgrad.defvjp(_fold_fwd, _fold_bwd)


def _auto_impl(x_shape, kshape, pads) -> str:
    """The formulation "auto" picks for a stride-1 3D conv (measured, `conv_general_dilated`)."""
    voxels = x_shape[0] * math.prod(
        n + lo + hi - k + 1 for n, (lo, hi), k in zip(x_shape[1:4], pads, kshape[:3], strict=True)
    )
    stacked = kshape[0] * kshape[-2] <= STACK_MAX_CHANNELS
    if voxels >= GEMM_GRAD_MIN_VOXELS or max(kshape[:3]) == 2:
        return "gemm" if stacked else "fold"
    return "stacked" if stacked else "summed"


def _accumulation_dtype(dtype: Any, preferred_element_type: Any) -> tuple[Any, Any]:
    """(dtype to accumulate partial sums in, dtype of the result) of a conv."""
    out = preferred_element_type or dtype
    acc = preferred_element_type
    if acc is None and jnp.finfo(out).bits < 32:
        acc = jnp.float32  # a conv accumulates low-precision inputs in float32 too
    return acc, out


def _conv3d_fold(
    x: jax.Array,
    w: jax.Array,
    pads: tuple[tuple[int, int], ...],
    *,
    stacked: bool,
    precision: Any,
    preferred_element_type: Any,
) -> jax.Array:
    """2D convs over the `K0` slices of the padded first spatial axis, folded into the batch.

    `stacked`: one conv on the slices concatenated along channels with the kernel
    `(K1, K2, K0 * C, O)`; otherwise the sum of `K0` convs with the kernel slices `w[k]`.
    """
    k0, c, o = w.shape[0], w.shape[-2], w.shape[-1]
    (lo, hi), rest = pads[0], pads[1:]
    x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (lo, hi, 0), *((0, 0, 0),) * 3])
    b, n, s1, s2 = x.shape[:4]
    m = n - k0 + 1
    taps = [lax.slice_in_dim(x, k, k + m, axis=1) for k in range(k0)]
    dn = _channels_last(4)
    if stacked:
        xs = jnp.concatenate(taps, axis=-1).reshape(b * m, s1, s2, k0 * c)
        w2 = jnp.moveaxis(w, 0, 2).reshape(*w.shape[1:3], k0 * c, o)
        y = lax.conv_general_dilated(
            xs,
            w2,
            (1, 1),
            rest,
            dimension_numbers=dn,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
    else:
        acc, out = _accumulation_dtype(x.dtype, preferred_element_type)
        parts = [
            lax.conv_general_dilated(
                t.reshape(b * m, s1, s2, c),
                w[k],
                (1, 1),
                rest,
                dimension_numbers=dn,
                precision=precision,
                preferred_element_type=acc,
            )
            for k, t in enumerate(taps)
        ]
        y = functools.reduce(jnp.add, parts).astype(out)
    return y.reshape(b, m, *y.shape[1:])


class _GemmPlan(NamedTuple):
    """How a stride-1 3D conv maps onto the flattened padded grid (see `_conv3d_gemm`)."""

    grid: tuple[int, int, int]  # padded spatial shape
    out: tuple[int, int, int]  # output spatial shape
    q: int  # rows of the flattened padded input, B * prod(grid)
    in_offsets: tuple[int, ...]  # row offsets of the taps stacked on the input side
    out_offsets: tuple[int, ...]  # row offsets of the taps summed on the output side
    in_taps: tuple[tuple[int, int, int], ...]
    out_taps: tuple[tuple[int, int, int], ...]
    inner: int  # number of inner kernel axes whose taps are on the input side

    @property
    def n_in(self) -> int:  # rows of the stacked input
        return self.q - self.in_offsets[-1]

    @property
    def n_out(self) -> int:  # rows of the output grid that are computed
        return self.n_in - self.out_offsets[-1]


def _gemm_plan(x_shape, kshape, pads) -> _GemmPlan:
    b, c, o = x_shape[0], kshape[-2], kshape[-1]
    ksize = tuple(kshape[:3])
    grid = tuple(n + lo + hi for n, (lo, hi) in zip(x_shape[1:4], pads, strict=True))
    strides = (grid[1] * grid[2], grid[2], 1)

    def width(a):
        t_in = math.prod(ksize[3 - a :])
        return t_in * c + (math.prod(ksize) // t_in) * o

    # Inner axes whose taps go on the input side: the cheaper of 1 or 2 in stacked widths.
    a = min((1, 2), key=width)

    def taps(axes):
        ranges = [range(k) if ax in axes else range(1) for ax, k in enumerate(ksize)]
        return tuple(itertools.product(*ranges))

    def offset(tap):
        return sum(t * s for t, s in zip(tap, strides, strict=True))

    in_taps, out_taps = taps(range(3 - a, 3)), taps(range(3 - a))
    return _GemmPlan(
        grid=grid,
        out=tuple(p - k + 1 for p, k in zip(grid, ksize, strict=True)),
        q=b * math.prod(grid),
        in_offsets=tuple(offset(t) for t in in_taps),
        out_offsets=tuple(offset(t) for t in out_taps),
        in_taps=in_taps,
        out_taps=out_taps,
        inner=a,
    )


def _gemm_kernel_matrix(w: jax.Array, plan: _GemmPlan) -> jax.Array:
    """`w` as `[T_in * C, T_out * O]`: row block = input-side tap, column block = output-side."""
    c, o = w.shape[-2], w.shape[-1]
    wm = jnp.stack(
        [
            jnp.concatenate(
                [w[tuple(i + j for i, j in zip(ti, to, strict=True))] for ti in plan.in_taps], 0
            )
            for to in plan.out_taps
        ],
        axis=1,
    )
    return wm.reshape(len(plan.in_taps) * c, len(plan.out_taps) * o)


def _pad_flat(x: jax.Array, pads) -> jax.Array:
    """`[B, N0, N1, N2, C]` padded by `pads` and flattened to `[Q, C]`."""
    x = lax.pad(
        x, jnp.zeros((), x.dtype), [(0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0)]
    )
    return x.reshape(-1, x.shape[-1])


def _shifted(a: jax.Array, offsets, n: int, axis: int) -> jax.Array:
    """Copies of `a` shifted by `+offsets[k]` along `axis` (zero-filled, length `n` there),
    concatenated along the other axis of the 2D `a`: block `k` is `a[r - offsets[k]]`."""
    top = max(offsets)
    pad = [(0, 0, 0), (0, 0, 0)]
    pad[axis] = (top, n - a.shape[axis], 0)
    padded = lax.pad(a, jnp.zeros((), a.dtype), pad)
    parts = [lax.slice_in_dim(padded, top - k, top - k + n, axis=axis) for k in offsets]
    return jnp.concatenate(parts, axis=1 - axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv3d_gemm(x, w, pads, precision, preferred_element_type):
    """The conv as one matrix product on the flattened padded grid plus a shifted sum.

    On the padded input flattened to `[Q, C]` (row `q` = voxel `(n, i, j, l)`, strides
    `(P1 * P2, P2, 1)`), a kernel tap `t` reads row `q + offset(t)`, so the output at the
    padded grid's row `q` is `sum_t x[q + offset(t)] @ w[t]`: exact for every valid output
    voxel (rows at the padding are computed and dropped). The taps are split between the
    two sides of one GEMM: the taps of the 1 or 2 inner kernel axes are stacked along the
    input's channels (`[Q, T_in * C]`, contiguous row-shifted slices), the others along the
    product's columns (`[Q, T_in * C] @ [T_in * C, T_out * O]`), and the `T_out` column
    blocks are summed at their row offsets.

    Its gradient (custom VJP) is GEMMs on row-major operands as well: the output gradient's
    row-shifted copies `dZ` (`[Q, T_out * O]`), `dX = shifted sum of dZ @ Wᵀ`, and
    `dW = stacked_xᵀ @ dZ` with the stacked input built from one transpose of the
    `C`-channel input, so no large operand is copied transposed.
    """
    plan = _gemm_plan(x.shape, w.shape, pads)
    o = w.shape[-1]
    xf = _pad_flat(x, pads)
    n_in, n_out = plan.n_in, plan.n_out
    xs = jnp.concatenate([lax.slice_in_dim(xf, k, k + n_in) for k in plan.in_offsets], axis=1)
    acc, out = _accumulation_dtype(x.dtype, preferred_element_type)
    z = lax.dot_general(
        xs,
        _gemm_kernel_matrix(w, plan),
        (((1,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=acc,
    )
    parts = [
        lax.slice(z, (k, i * o), (k + n_out, (i + 1) * o)) for i, k in enumerate(plan.out_offsets)
    ]
    y = functools.reduce(jnp.add, parts).astype(out)
    y = jnp.pad(y, ((0, plan.q - n_out), (0, 0))).reshape(x.shape[0], *plan.grid, o)
    return y[:, : plan.out[0], : plan.out[1], : plan.out[2]]


def _gemm_fwd(x, w, pads, precision, preferred_element_type):
    return _conv3d_gemm(x, w, pads, precision, preferred_element_type), (x, w)


def _gemm_bwd(pads, precision, preferred_element_type, res, dy):
    x, w = res
    plan = _gemm_plan(x.shape, w.shape, pads)
    c = x.shape[-1]
    acc = jnp.float32 if jnp.finfo(dy.dtype).bits < 32 else None
    dyf = _grad_rows(dy, plan)
    dz = _shifted(dyf, plan.out_offsets, plan.n_in, axis=0)  # [n_in, T_out * O]
    dxs = lax.dot_general(
        dz,
        _gemm_kernel_matrix(w, plan).astype(dz.dtype),
        (((1,), (1,)), ((), ())),
        precision=precision,
        preferred_element_type=acc,
    )
    parts = [
        lax.pad(
            dxs[:, i * c : (i + 1) * c],
            jnp.zeros((), dxs.dtype),
            [(k, plan.q - plan.n_in - k, 0), (0, 0, 0)],
        )
        for i, k in enumerate(plan.in_offsets)
    ]
    dx = functools.reduce(jnp.add, parts).reshape(x.shape[0], *plan.grid, c)
    dx = dx[:, *(slice(lo, lo + n) for (lo, _), n in zip(pads, x.shape[1:4], strict=True))]
    dw = _kernel_grad(x, dyf, w.shape, plan, pads, precision, dz=dz)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_conv3d_gemm.defvjp(_gemm_fwd, _gemm_bwd)


def _grad_rows(dy: jax.Array, plan: _GemmPlan) -> jax.Array:
    """The output gradient on the padded grid, flattened: `[n_out, O]`."""
    o = dy.shape[-1]
    pad = [(0, 0, 0), *((0, p - n, 0) for p, n in zip(plan.grid, plan.out, strict=True)), (0, 0, 0)]
    return lax.pad(dy, jnp.zeros((), dy.dtype), pad).reshape(plan.q, o)[: plan.n_out]


def _kernel_grad(x, dyf, kshape, plan: _GemmPlan, pads, precision, dz=None) -> jax.Array:
    """`dL/dw` as one GEMM `stacked_xᵀ @ dZ` over the rows of the padded grid.

    The side with fewer stacked columns is built transposed from one transpose of its
    (input or output gradient) array, so the GEMM's operands are both row-major and XLA
    copies no large operand transposed. `dz` (`[n_in, T_out * O]`) is reused if given.
    """
    c, o = kshape[-2], kshape[-1]
    n = plan.n_in
    xf = _pad_flat(x, pads)
    acc = jnp.float32 if jnp.finfo(x.dtype).bits < 32 else None
    dims = (((1,), (0,)), ((), ()))
    dyf = dyf.astype(x.dtype)
    if len(plan.out_offsets) * o < len(plan.in_offsets) * c:
        dz_t = _shifted(dyf.T, plan.out_offsets, n, axis=1)  # [T_out * O, n]
        xs = jnp.concatenate([lax.slice_in_dim(xf, k, k + n) for k in plan.in_offsets], axis=1)
        dw = lax.dot_general(dz_t, xs, dims, precision=precision, preferred_element_type=acc).T
    else:
        xt = xf.T  # one transpose of the C-channel input
        xs_t = jnp.concatenate([lax.slice_in_dim(xt, k, k + n, axis=1) for k in plan.in_offsets])
        if dz is None:
            dz = _shifted(dyf, plan.out_offsets, n, axis=0)
        dw = lax.dot_general(
            xs_t, dz.astype(x.dtype), dims, precision=precision, preferred_element_type=acc
        )
    # [(T_in, C), (T_out, O)] -> (*inner, c, *outer, o) -> (*outer, *inner, c, o)
    a = plan.inner
    ksize = kshape[:3]
    dw = dw.reshape(*ksize[3 - a :], c, *ksize[: 3 - a], o)
    return jnp.transpose(dw, (*range(a + 1, 4), *range(a), a, 4))


def _kernel_grad_gemm(x, dy, kshape, pads, precision) -> jax.Array:
    """`dL/dw` of a stride-1 channels-last 3D conv computed as one GEMM (`_kernel_grad`)."""
    plan = _gemm_plan(x.shape, kshape, pads)
    return _kernel_grad(x, _grad_rows(dy, plan), kshape, plan, pads, precision)


def conv3(
    features: int, spatial_dims: int, *, strides: int = 1, name: str, dtype: Any = None
) -> nn.Conv:
    """A 3×3(×3) convolution, padding 1 on each side, no bias (the paper code's layout).

    Padding 1 (not XLA's "SAME") keeps strided windows centred on the even voxels, aligned
    with the 1×1 stride-2 shortcut, exactly like PyTorch's `padding=1`.
    """
    return nn.Conv(
        features,
        kernel_size=(3,) * spatial_dims,
        strides=(strides,) * spatial_dims,
        padding=((1, 1),) * spatial_dims,
        use_bias=False,
        dtype=dtype,
        conv_general_dilated=conv_general_dilated,
        name=name,
    )


def conv1(
    features: int,
    spatial_dims: int,
    *,
    strides: int = 1,
    use_bias: bool = False,
    name: str,
    dtype: Any = None,
    kernel_init: Any = None,
) -> nn.Conv:
    """A 1×1(×1) convolution (projection, shortcut, upsampling or class scores)."""
    return nn.Conv(
        features,
        kernel_size=(1,) * spatial_dims,
        strides=(strides,) * spatial_dims,
        padding="VALID",
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=nn.initializers.lecun_normal() if kernel_init is None else kernel_init,
        conv_general_dilated=conv_general_dilated,
        name=name,
    )


def instance_norm(x: jax.Array) -> jax.Array:
    """Instance norm without affine parameters over the spatial axes of `[B, *S, C]`.

    The same normalisation as `nn.InstanceNorm(epsilon=1e-5, use_scale=False,
    use_bias=False)` (tested), written as a function: it has no parameters, and Flax's
    norms cannot take bfloat16 inputs under `jax_numpy_dtype_promotion="strict"` (they
    promote bfloat16 with float32 implicitly). Statistics are computed in float32 (two-pass
    variance) and the result is cast back to `x.dtype`.
    """
    axes = tuple(range(1, x.ndim - 1))
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=axes, keepdims=True)
    centred = xf - mean
    var = jnp.mean(jnp.square(centred), axis=axes, keepdims=True)
    return (centred * lax.rsqrt(var + NORM_EPSILON)).astype(x.dtype)


def depth_to_space(x: jax.Array, spatial_dims: int) -> jax.Array:
    """`[B, *S, 2**d * C]` → `[B, *(2 * S), C]`; channel index = offset-major, channel-minor.

    The channel axis is read as `(2,) * d + (C,)`: channel `(o_1, ..., o_d, c)` becomes the
    voxel at offset `(o_1, ..., o_d)` inside each 2×2(×2) output cell.
    """
    d = spatial_dims
    b, *spatial, c_all = x.shape
    c = c_all // 2**d
    x = x.reshape(b, *spatial, *(2,) * d, c)
    # axes: 0 batch, 1..d spatial, d+1..2d offsets, 2d+1 channels -> interleave (s_i, o_i).
    perm = [0]
    for i in range(d):
        perm += [1 + i, 1 + d + i]
    perm.append(2 * d + 1)
    x = jnp.transpose(x, perm)
    return x.reshape(b, *(2 * s for s in spatial), c)


def replicate_init(channels: int, spatial_dims: int):
    """Kernel init making a 1×1 conv + `depth_to_space` a nearest-neighbour ×2 upsampling.

    The 2×2(×2) stride-2 analogue of FCN's bilinear-initialised deconvolution: each output
    voxel starts as a copy of its input voxel, and the mapping is then learned.
    """

    def init(key, shape, dtype=jnp.float32):
        del key
        kernel = jnp.tile(jnp.eye(channels, dtype=dtype), (1, 2**spatial_dims))
        return kernel.reshape(shape)

    return init


def upsample2x(
    x: jax.Array,
    *,
    features: int | None,
    mode: Upsample,
    spatial_dims: int,
    name: str,
    dtype: Any = None,
    kernel_init: Any = None,
) -> jax.Array:
    """×2 upsampling of `[B, *S, C]` to `[B, *(2 * S), features]`; call inside a compact method.

    Modes:
      `"resize"`: a 1×1 conv named `name` to `features` channels (skipped when `features` is
        None), then `jax.image.resize(..., "linear")`: linear interpolation with half-pixel
        centres and edge replication. The paper code used
        `nn.Upsample(mode="trilinear", align_corners=True)`, which maps corner to corner
        instead; the two differ by a sub-voxel shift. A 1×1 conv commutes with a
        per-channel linear resize, so it runs at the low resolution.
      `"transpose"`: a learned transposed convolution with kernel 2 and stride 2, written as
        the exactly equivalent 1×1 conv named `name` to `2**d * features` channels followed
        by `depth_to_space` (the stride equals the kernel, so windows do not overlap). This
        keeps every convolution an `nn.Conv` and avoids `lax.conv_transpose`, whose 3D
        gradient is slow in XLA (jax issue #31662; 39-64× slower forward+backward here,
        `benchmarks/upsampling.py`). Its kernel has shape `(1,) * d + (C, 2**d * features)`,
        channel `(o_1, ..., o_d, c)` being the tap at offset `o`; it equals
        `nn.ConvTranspose(features, (2,) * d, strides=(2,) * d, padding="VALID")` with
        that module's kernel flipped along the spatial axes (tested).
    """
    d = spatial_dims
    if mode == "resize":
        if features is not None:
            x = conv1(features, d, name=name, dtype=dtype, kernel_init=kernel_init)(x)
        b, *spatial, c = x.shape
        return jax.image.resize(x, (b, *(2 * s for s in spatial), c), method="linear")
    if mode == "transpose":
        out = x.shape[-1] if features is None else features
        x = conv1(out * 2**d, d, name=name, dtype=dtype, kernel_init=kernel_init)(x)
        return depth_to_space(x, d)
    raise ValueError(f"upsample must be one of {UPSAMPLE_MODES!r}, got {mode!r}")


# --------------------------------------------------------------------------- blocks


class ResBlock(nn.Module):
    """The paper code's `BasicDownBlock`: a pre-activation residual block.

    `y = conv_2(drop(relu(norm(conv_1(drop(relu(norm(x))))))))`, returned as `y + s` where
    the shortcut `s` is `x` itself when the block keeps resolution and channels, and
    `shortcut(relu(norm(x)))`, a 1×1(×1) conv with the block's stride, otherwise (the paper
    code's pre-activated `ConvBlock(kernel=1, stride=2)`). `norm` is `instance_norm`.

    Attributes:
      features: output channels.
      spatial_dims: 2 or 3.
      strides: 1, or 2 to halve every spatial size (`conv_1` and `shortcut` are strided).
      dropout_rate: dropout after each activation that feeds a 3×3 conv (rng stream
        `"dropout"`, active only when `train=True`).
      dtype: computation dtype of the convolutions (None: from inputs and parameters).

    Submodules: `conv_1`, `conv_2`, `shortcut` (only when needed).
    """

    features: int
    spatial_dims: int
    strides: int = 1
    dropout_rate: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        d = self.spatial_dims
        h = nn.relu(instance_norm(x))
        y = nn.Dropout(self.dropout_rate, name="dropout_1")(h, deterministic=not train)
        y = conv3(self.features, d, strides=self.strides, name="conv_1", dtype=self.dtype)(y)
        y = nn.relu(instance_norm(y))
        y = nn.Dropout(self.dropout_rate, name="dropout_2")(y, deterministic=not train)
        y = conv3(self.features, d, name="conv_2", dtype=self.dtype)(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            s = conv1(self.features, d, strides=self.strides, name="shortcut", dtype=self.dtype)(h)
        else:
            s = x
        return y + s


class UpBlock(nn.Module):
    """The paper code's `BasicUpBlock`: upsample, add the skip, two pre-activation convs.

    `u = up(relu(norm(x))) + skip`, `y = conv_2(...conv_1(drop(relu(norm(u)))))`,
    returns `y + u`. `up` is `upsample2x` (a 1×1 conv named `upsample` plus resize, or the
    equivalent of a kernel-2 stride-2 transposed conv, see `upsample2x`).

    Attributes:
      features: output channels (also the skip's channels).
      spatial_dims: 2 or 3.
      upsample: `"resize"` or `"transpose"`.
      dropout_rate: as in `ResBlock`.
      dtype: computation dtype of the convolutions.

    Submodules: `upsample`, `conv_1`, `conv_2`.
    """

    features: int
    spatial_dims: int
    upsample: Upsample = "resize"
    dropout_rate: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, skip: jax.Array, *, train: bool = False) -> jax.Array:
        d = self.spatial_dims
        h = nn.relu(instance_norm(x))
        u = upsample2x(
            h,
            features=self.features,
            mode=self.upsample,
            spatial_dims=d,
            name="upsample",
            dtype=self.dtype,
        )
        u = u + skip.astype(u.dtype)
        y = nn.relu(instance_norm(u))
        y = nn.Dropout(self.dropout_rate, name="dropout_1")(y, deterministic=not train)
        y = conv3(self.features, d, name="conv_1", dtype=self.dtype)(y)
        y = nn.relu(instance_norm(y))
        y = nn.Dropout(self.dropout_rate, name="dropout_2")(y, deterministic=not train)
        y = conv3(self.features, d, name="conv_2", dtype=self.dtype)(y)
        return y + u
