"""3D convolutions whose formulation is chosen by measurement on the machine at hand.

`ConvEngine` is a drop-in for `lax.conv_general_dilated` (the backbones pass it to
`nn.Conv(conv_general_dilated=...)`). It rewrites strided 3D convs as stride-1 ones and
computes each stride-1 3D conv in three pieces (forward, input gradient, kernel gradient),
each by the formulation (`vi_seg_jax.ops.conv_forms`) measured fastest on the machine at
hand (`vi_seg_jax.ops.conv_tuning`), or by one formulation for all when forced.

The backward pass keeps only the conv's input and kernel and rebuilds any expanded operand
(stacked taps, shifted copies) when it needs it, so no formulation stores more for the
backward pass than XLA's own conv does.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from vi_seg_jax.ops import onednn
from vi_seg_jax.ops.conv_forms import (
    FORWARD,
    FORWARD_FORMS,
    KERNEL_GRAD,
    ConvChoice,
    channels_last,
    input_grad_kernel,
    input_grad_pads,
)
from vi_seg_jax.ops.conv_tuning import piece_form

# `ConvEngine.impl`: "auto" (measured), "lax" (XLA's conv with no rewrite at all), or one
# formulation for every piece of every 3D conv.
CONV_IMPLS: tuple[str, ...] = ("auto", "lax", *FORWARD_FORMS)


@dataclasses.dataclass(frozen=True)
class ConvEngine:
    """`lax.conv_general_dilated` with fast, exact paths for 3D channels-last convs.

    A frozen (hashable) value: the backbones hold one as a module attribute and pass it to
    `nn.Conv(conv_general_dilated=...)`, so the choice is part of the traced program, never
    a global read at trace time. 2D convs, and any 3D conv that is not channels-last without
    dilation or groups, go straight to XLA.

    Strided 3D convs become stride-1 ones first (XLA's CPU backward pass of a strided 3D
    conv is 10-60× slower than its forward pass, jax issue #31662):
    - a 1×1(×1) kernel: subsample the (padded) input, then a stride-1 conv;
    - a kernel `K` with stride `s`: pad/crop the input to `s * (n_out + Q - 1)` per axis,
      `Q = ceil(K / s)`, space-to-depth by `s`, and a stride-1 VALID conv with the kernel
      zero-padded to `Q * s` and rearranged to `(Q,) * d + (s**d * C_in, C_out)` (2.4× the
      strided conv's FLOPs for 3×3×3 stride 2, and still faster forward+backward).
    Where oneDNN computes the stride-1 rewrite fastest (or `impl="onednn"`), a strided conv
    with a kernel larger than 1 runs on oneDNN's strided kernels instead, unrewritten.
    Every stride-1 3D conv is then computed piece by piece (`conv_stride1`): with
    `impl="auto"` each piece by `conv_tuning.piece_form`, looked up (or measured) when that
    piece is traced, so a forward-only program never tunes gradients; otherwise by `impl`.
    1×1×1 kernels are a matrix product per voxel, always GEMMs.

    Attributes:
      impl: one of `CONV_IMPLS`.
    """

    impl: str = "auto"

    def __post_init__(self) -> None:
        if self.impl not in CONV_IMPLS:
            raise ValueError(f"conv impl must be one of {CONV_IMPLS!r}, got {self.impl!r}")

    def __call__(
        self,
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
        nd = lhs.ndim
        d = nd - 2
        strides = tuple(int(s) for s in window_strides)
        fast = (
            self.impl != "lax"
            and d == 3
            and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            == channels_last(nd)
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
        spatial, ksize = lhs.shape[1:-1], rhs.shape[:-2]
        if isinstance(padding, str):
            padding = lax.padtype_to_pads(spatial, ksize, strides, padding)
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
        x, w, pads1 = _as_stride1(lhs, rhs, strides, pads)
        if max(strides) > 1 and max(ksize) > 1 and self._onednn_strided(x, w, pads1):
            return onednn.strided_conv(lhs, rhs, strides, pads).astype(
                preferred_element_type or lhs.dtype
            )
        return conv_stride1(x, w, pads1, self.choice(w.shape), precision, preferred_element_type)

    def _onednn_strided(self, x, w, pads) -> bool:
        """Whether a strided conv runs on oneDNN's strided kernels: forced, or where oneDNN
        computes the stride-1 rewrite fastest (its strided kernels then win by the rewrite's
        extra FLOPs)."""
        if self.impl == "onednn":
            return True
        return (
            self.impl == "auto"
            and onednn.available(x.dtype)
            and piece_form("forward", x.shape, w.shape, pads, x.dtype) == "onednn"
        )

    def choice(self, w_shape) -> ConvChoice:
        """The formulations of a stride-1 conv with this kernel ("auto": measured)."""
        if all(k == 1 for k in w_shape[:3]):
            return ConvChoice.every("gemm")
        # "auto": each piece is looked up (or measured) when it is traced, so a forward-only
        # program never tunes gradients.
        return ConvChoice.every(self.impl)


def _as_stride1(lhs, rhs, strides, pads):
    """`(x, w, pads)` of the stride-1 conv equal to the strided one (see `ConvEngine`)."""
    if all(s == 1 for s in strides):
        return lhs, rhs, pads
    d = len(strides)
    spatial, ksize = lhs.shape[1:-1], rhs.shape[:-2]
    n_out = tuple(
        (n + lo + hi - k) // s + 1
        for n, (lo, hi), k, s in zip(spatial, pads, ksize, strides, strict=True)
    )
    zero = jnp.zeros((), lhs.dtype)
    no_pads = ((0, 0),) * d
    if all(k == 1 for k in ksize):
        x = lax.pad(lhs, zero, [(0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0)])
        limit = (x.shape[0], *(s * (m - 1) + 1 for s, m in zip(strides, n_out, strict=True)))
        x = lax.slice(x, (0,) * lhs.ndim, (*limit, x.shape[-1]), (1, *strides, 1))
        return x, rhs, no_pads
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
    x = x.reshape(b, *blocks, math.prod(strides) * c)
    o = rhs.shape[-1]
    w = jnp.pad(
        rhs,
        [*((0, qq * s - k) for qq, s, k in zip(q, strides, ksize, strict=True)), (0, 0), (0, 0)],
    )
    w = w.reshape(*(v for qq, s in zip(q, strides, strict=True) for v in (qq, s)), c, o)
    w = jnp.transpose(w, (*range(0, 2 * d, 2), *range(1, 2 * d, 2), 2 * d, 2 * d + 1))
    return x, w.reshape(*q, math.prod(strides) * c, o), no_pads


# --------------------------------------------------------------------------- one conv


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv_stride1(x, w, pads, choice: ConvChoice, precision, preferred_element_type):
    """A stride-1 channels-last 3D conv computed piece by piece as `choice` says ("auto":
    `conv_tuning.piece_form`, resolved when the piece is traced)."""
    form = _resolve(choice.forward, "forward", x.shape, w.shape, pads, x.dtype)
    return FORWARD[form](x, w, pads, precision, preferred_element_type)


def _conv_fwd(x, w, pads, choice, precision, preferred_element_type):
    # Only the operands are kept: every expanded intermediate is rebuilt in the backward pass.
    return conv_stride1(x, w, pads, choice, precision, preferred_element_type), (x, w)


def _conv_bwd(pads, choice, precision, preferred_element_type, residuals, dy):
    del preferred_element_type
    x, w = residuals
    w_t, pads_t = input_grad_kernel(w.astype(dy.dtype)), input_grad_pads(w.shape, pads)
    dx_form = _resolve(choice.input_grad, "forward", dy.shape, w_t.shape, pads_t, dy.dtype)
    dw_form = _resolve(choice.kernel_grad, "kernel_grad", x.shape, w.shape, pads, x.dtype)
    dx = FORWARD[dx_form](dy, w_t, pads_t, precision, None)
    dw = KERNEL_GRAD[dw_form](x, dy.astype(x.dtype), w.shape, pads, precision)
    return dx.astype(x.dtype), dw.astype(w.dtype)


conv_stride1.defvjp(_conv_fwd, _conv_bwd)


def _resolve(form: str, piece: str, x_shape, w_shape, pads, dtype) -> str:
    return piece_form(piece, x_shape, w_shape, pads, dtype) if form == "auto" else form
