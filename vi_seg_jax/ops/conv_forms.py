"""Exact formulations of a stride-1, channels-last 3D convolution and of its gradients.

Each forward formulation (`FORWARD`, also used for the input gradient, itself a stride-1
conv) and each kernel-gradient formulation (`KERNEL_GRAD`) computes the same numbers as
`lax.conv_general_dilated` up to float rounding; `vi_seg_jax.ops.conv3d` combines them and
`vi_seg_jax.ops.conv_tuning` times them.

- `"xla"`: XLA's own conv (slow on CPUs, well below XLA's matrix products; the numbers are
  in `benchmarks/train_step.py`'s output and the README's Performance section).
- `"summed"` / `"stacked"`: the first spatial axis is padded, its `K0` shifted slices are
  folded into the batch, and the conv becomes 2D convolutions over the other two axes: the
  sum of `K0` convs with the kernel slices `w[k]`, or one conv on the slices stacked along
  channels with a `(K1, K2, K0 * C_in, C_out)` kernel (better for few input channels).
- `"gemm"`: one matrix product on the flattened padded grid plus a shifted sum (`_gemm`);
  its kernel gradient is one GEMM over the rows of that grid (`_kernel_grad_gemm`).
- `"onednn"`: oneDNN's direct convolutions, forward and kernel gradient
  (`vi_seg_jax.ops.onednn`; float32 on CPUs where the library is installed).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from vi_seg_jax.ops import onednn

FORWARD_FORMS: tuple[str, ...] = ("xla", "summed", "stacked", "gemm", "onednn")
# "summed@s": the kernel gradient of "summed" accumulated over slabs of `s` output slices of
# the first spatial axis. XLA's 2D kernel-gradient conv is several times faster on such slabs
# than on the whole folded batch, and which slab size wins depends on the shape and the
# machine (so the tuning measures it).
SLAB_SIZES: tuple[int, ...] = (1, 2, 4, 8)
KERNEL_GRAD_FORMS: tuple[str, ...] = (
    "xla",
    "summed",
    "stacked",
    "gemm",
    "onednn",
    *(f"summed@{s}" for s in SLAB_SIZES),
    *(f"stacked@{s}" for s in (2, 8)),
)


class ConvChoice(NamedTuple):
    """The formulation of each piece of one stride-1 3D conv."""

    forward: str
    input_grad: str
    kernel_grad: str

    @classmethod
    def every(cls, form: str) -> ConvChoice:
        return cls(form, form, form)


# --------------------------------------------------------------------------- the engine


def channels_last(nd: int) -> lax.ConvDimensionNumbers:
    """Dimension numbers of a channels-last conv of rank `nd` (NHWC / HWIO / NHWC)."""
    return lax.ConvDimensionNumbers(
        (0, nd - 1, *range(1, nd - 1)),
        (nd - 1, nd - 2, *range(nd - 2)),
        (0, nd - 1, *range(1, nd - 1)),
    )


def input_grad_pads(kshape, pads) -> tuple[tuple[int, int], ...]:
    """The padding of the conv that is a stride-1 conv's input gradient:
    `dx = conv(dy, input_grad_kernel(w))` with padding `K - 1 - pad` on each side."""
    return tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(kshape[:3], pads, strict=True))


def input_grad_kernel(w: jax.Array) -> jax.Array:
    """The kernel of that conv: `w` flipped spatially, input and output channels swapped."""
    return jnp.swapaxes(jnp.flip(w, (0, 1, 2)), -1, -2)


def _accumulation_dtype(dtype: Any, preferred_element_type: Any) -> tuple[Any, Any]:
    """(dtype to accumulate partial sums in, dtype of the result) of a conv."""
    out = preferred_element_type or dtype
    acc = preferred_element_type
    if acc is None and jnp.finfo(out).bits < 32:
        acc = jnp.float32  # a conv accumulates low-precision inputs in float32 too
    return acc, out


def _xla(x, w, pads, precision, preferred_element_type):
    return lax.conv_general_dilated(
        x,
        w,
        (1, 1, 1),
        pads,
        dimension_numbers=channels_last(5),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


def _fold(x, w, pads, precision, preferred_element_type, *, stacked: bool):
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
    conv2d = functools.partial(
        lax.conv_general_dilated,
        window_strides=(1, 1),
        padding=rest,
        dimension_numbers=channels_last(4),
        precision=precision,
    )
    if stacked:
        xs = jnp.concatenate(taps, axis=-1).reshape(b * m, s1, s2, k0 * c)
        w2 = jnp.moveaxis(w, 0, 2).reshape(*w.shape[1:3], k0 * c, o)
        y = conv2d(xs, w2, preferred_element_type=preferred_element_type)
    else:
        acc, out = _accumulation_dtype(x.dtype, preferred_element_type)
        parts = [
            conv2d(t.reshape(b * m, s1, s2, c), w[k], preferred_element_type=acc)
            for k, t in enumerate(taps)
        ]
        y = functools.reduce(jnp.add, parts).astype(out)
    return y.reshape(b, m, *y.shape[1:])


class _GemmPlan(NamedTuple):
    """How a stride-1 3D conv maps onto the flattened padded grid (see `_gemm`)."""

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


def _gemm(x, w, pads, precision, preferred_element_type):
    """The conv as one matrix product on the flattened padded grid plus a shifted sum.

    On the padded input flattened to `[Q, C]` (row `q` = voxel `(n, i, j, l)`, strides
    `(P1 * P2, P2, 1)`), a kernel tap `t` reads row `q + offset(t)`, so the output at the
    padded grid's row `q` is `sum_t x[q + offset(t)] @ w[t]`: exact for every valid output
    voxel (rows at the padding are computed and dropped). The taps are split between the
    two sides of one GEMM: the taps of the 1 or 2 inner kernel axes are stacked along the
    input's channels (`[Q, T_in * C]`, contiguous row-shifted slices), the others along the
    product's columns (`[Q, T_in * C] @ [T_in * C, T_out * O]`), and the `T_out` column
    blocks are summed at their row offsets.
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


FORWARD: dict[str, Callable] = {
    "xla": _xla,
    "summed": functools.partial(_fold, stacked=False),
    "stacked": functools.partial(_fold, stacked=True),
    "gemm": _gemm,
    "onednn": onednn.forward,
}


def _kernel_grad_by_vjp(form: str):
    """The kernel gradient of a forward formulation, by autodiff (the conv is linear in w)."""

    def kernel_grad(x, dy, kshape, pads, precision):
        def forward(w):
            return FORWARD[form](x, w, pads, precision, None)

        _, vjp = jax.vjp(forward, jnp.zeros(kshape, x.dtype))
        return vjp(dy)[0]

    return kernel_grad


def _kernel_grad_gemm(x, dy, kshape, pads, precision) -> jax.Array:
    """`dL/dw` as one GEMM `stacked_xᵀ @ dZ` over the rows of the padded grid.

    The side with fewer stacked columns is built transposed from one transpose of its
    (input or output gradient) array, so the GEMM's operands are both row-major and XLA
    copies no large operand transposed (XLA's own kernel-gradient conv copies its operands
    batch-minor, which at 2×64³ costs more than the conv).
    """
    plan = _gemm_plan(x.shape, kshape, pads)
    c, o = kshape[-2], kshape[-1]
    n = plan.n_in
    pad = [(0, 0, 0), *((0, p - m, 0) for p, m in zip(plan.grid, plan.out, strict=True)), (0, 0, 0)]
    dyf = lax.pad(dy, jnp.zeros((), dy.dtype), pad).reshape(plan.q, o)[: plan.n_out]
    xf = _pad_flat(x, pads)
    acc = jnp.float32 if jnp.finfo(x.dtype).bits < 32 else None
    dims = (((1,), (0,)), ((), ()))
    if len(plan.out_offsets) * o < len(plan.in_offsets) * c:
        dz_t = _shifted(dyf.T, plan.out_offsets, n, axis=1)  # [T_out * O, n]
        xs = jnp.concatenate([lax.slice_in_dim(xf, k, k + n) for k in plan.in_offsets], axis=1)
        dw = lax.dot_general(dz_t, xs, dims, precision=precision, preferred_element_type=acc).T
    else:
        xt = xf.T  # one transpose of the C-channel input
        xs_t = jnp.concatenate([lax.slice_in_dim(xt, k, k + n, axis=1) for k in plan.in_offsets])
        dz = _shifted(dyf, plan.out_offsets, n, axis=0)
        dw = lax.dot_general(xs_t, dz, dims, precision=precision, preferred_element_type=acc)
    # [(T_in, C), (T_out, O)] -> (*inner, c, *outer, o) -> (*outer, *inner, c, o)
    a = plan.inner
    ksize = kshape[:3]
    dw = dw.reshape(*ksize[3 - a :], c, *ksize[: 3 - a], o)
    return jnp.transpose(dw, (*range(a + 1, 4), *range(a), a, 4))


def _kernel_grad_by_slabs(form: str, slab: int):
    """`form`'s kernel gradient summed over slabs of `slab` output slices (first axis)."""
    by_vjp = _kernel_grad_by_vjp(form)

    def kernel_grad(x, dy, kshape, pads, precision):
        k0, (lo, hi) = kshape[0], pads[0]
        x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), (lo, hi, 0), *((0, 0, 0),) * 3])
        rest = ((0, 0), *pads[1:])
        m = dy.shape[1]
        parts = [
            by_vjp(
                x[:, i : min(i + slab, m) + k0 - 1], dy[:, i : i + slab], kshape, rest, precision
            )
            for i in range(0, m, slab)
        ]
        return functools.reduce(jnp.add, parts)

    return kernel_grad


KERNEL_GRAD: dict[str, Callable] = {
    "xla": _kernel_grad_by_vjp("xla"),
    "summed": _kernel_grad_by_vjp("summed"),
    "stacked": _kernel_grad_by_vjp("stacked"),
    "gemm": _kernel_grad_gemm,
    "onednn": onednn.kernel_grad,
    **{
        form: _kernel_grad_by_slabs(form.split("@")[0], int(form.split("@")[1]))
        for form in KERNEL_GRAD_FORMS
        if "@" in form
    },
}


# --------------------------------------------------------------------------- the choice
