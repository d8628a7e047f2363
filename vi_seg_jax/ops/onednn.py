"""3D convolutions by oneDNN (Intel's deep-learning kernel library, the one PyTorch's CPU
convolutions use), called from jitted programs.

XLA:CPU composes a 3D conv from generic pieces (its own slow conv, 2D convs, GEMMs on
expanded operands), all bound by memory traffic at a segmentation network's small channel
counts. oneDNN's direct convolutions are JIT-compiled for the CPU at hand (AVX2, AVX-512,
AMX) and read channels-last (`ndhwc`) activations in place, so `FORWARD_FORMS` and
`KERNEL_GRAD_FORMS` offer them as the formulation `"onednn"` and the tuning measures them
beside XLA's.

The library comes from the `onednn-cpu-gomp` wheel (a dependency on x86-64 Linux) or
wherever `VI_SEG_JAX_ONEDNN_LIBRARY` points; it is called through its C API with `ctypes`
from an XLA custom call (`vi_seg_jax.ops.ffi_handler`) on XLA's own buffers, so nothing is
compiled at install time and no operand is copied. Where it is missing, off CPUs, or for
other dtypes than float32, `available()` is false and the formulation is not a candidate.
Activations and gradients keep the caller's channels-last layout; only the small kernel is
reordered to oneDNN's blocked layout on each call. `strided_conv` runs strided convs on
oneDNN's strided kernels (all three pieces), which `ConvEngine` uses where oneDNN wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from vi_seg_jax.ops import ffi_handler, partitioning

ENV_LIBRARY = "VI_SEG_JAX_ONEDNN_LIBRARY"

# Values of the oneDNN 3.x C API (oneapi/dnnl/dnnl_types.h, dnnl_common_types.h).
_SUCCESS = 0
_CPU_ENGINE = 1
_STREAM_IN_ORDER = 1
_F32 = 3
_FORMAT_ANY = 1
_FORWARD_TRAINING = 64
_CONVOLUTION_DIRECT = 1
_QUERY_WEIGHTS_MD = 131
_QUERY_DIFF_WEIGHTS_MD = 132
_QUERY_SCRATCHPAD_MD = 136
_SCRATCHPAD_MODE_USER = 1
_ARG_SCRATCHPAD = 80
_ARG_SRC, _ARG_DST, _ARG_WEIGHTS = 1, 17, 33
_ARG_DIFF_SRC, _ARG_DIFF_DST, _ARG_DIFF_WEIGHTS = 129, 145, 161
_MAX_DIMS = 12
_Dims = ctypes.c_int64 * _MAX_DIMS


class _ExecArg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_int), ("memory", ctypes.c_void_p)]


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int)]


def _candidate_paths() -> list[str]:
    if os.environ.get(ENV_LIBRARY):
        return [os.environ[ENV_LIBRARY]]
    # The wheel installs the library into the environment's lib/ folder.
    paths = [str(Path(sys.prefix) / "lib" / "libdnnl.so.3")]
    found = ctypes.util.find_library("dnnl")
    return paths + ([found] if found else [])


class _Library:
    """The loaded library, its CPU engine, and one stream per calling thread."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        lib.dnnl_primitive_desc_query_md.restype = ctypes.c_void_p
        lib.dnnl_memory_desc_get_size.restype = ctypes.c_size_t
        self.engine = ctypes.c_void_p()
        _check(lib.dnnl_engine_create(ctypes.byref(self.engine), _CPU_ENGINE, 0), "engine")
        # Every primitive gets its scratch memory from the caller. The library's own
        # scratchpad is per thread and bound to the thread that created the primitive, and
        # XLA runs the calls on its own threads: those with a scratchpad (gemm-based kernels
        # for small grids) crashed there.
        self.attr = ctypes.c_void_p()
        _check(lib.dnnl_primitive_attr_create(ctypes.byref(self.attr)), "attributes")
        _check(
            lib.dnnl_primitive_attr_set_scratchpad_mode(self.attr, _SCRATCHPAD_MODE_USER),
            "scratchpad mode",
        )
        self._local = threading.local()
        # XLA runs independent ops on several threads; two oneDNN calls at once would run
        # two OpenMP teams on the same cores, each spinning while it waits for the other
        # (measured: a step that takes seconds took over ten minutes). One at a time, each
        # on every core.
        self.lock = threading.Lock()

    def stream(self) -> ctypes.c_void_p:
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = ctypes.c_void_p()
            _check(
                self.lib.dnnl_stream_create(ctypes.byref(stream), self.engine, _STREAM_IN_ORDER),
                "stream",
            )
            self._local.stream = stream
        return stream


def _check(status: int, what: str) -> None:
    if status != _SUCCESS:
        raise RuntimeError(f"oneDNN {what} failed with status {status}")


@functools.cache
def _library() -> _Library | None:
    for path in _candidate_paths():
        try:
            lib = ctypes.CDLL(path)
            lib.dnnl_version.restype = ctypes.POINTER(_Version)
            if lib.dnnl_version().contents.major != 3:
                continue
            return _Library(lib)
        except (OSError, AttributeError, RuntimeError):
            continue
    return None


def available(dtype=jnp.float32) -> bool:
    """Whether `"onednn"` can compute convs of `dtype` here (CPU backend, float32, the
    library loaded)."""
    return (
        jnp.dtype(dtype) == jnp.float32
        and jax.default_backend() == "cpu"
        and _library() is not None
    )


def version() -> str | None:
    """The loaded oneDNN version ("3.2.0"), None where it is not available."""
    library = _library()
    if library is None:
        return None
    v = library.lib.dnnl_version().contents
    return f"{v.major}.{v.minor}.{v.patch}"


# --------------------------------------------------------------------------- descriptors


def _memory_desc(library: _Library, dims, strides=None) -> ctypes.c_void_p:
    """A float32 descriptor with these logical dims: plain with `strides`, else "any"."""
    md = ctypes.c_void_p()
    if strides is None:
        status = library.lib.dnnl_memory_desc_create_with_tag(
            ctypes.byref(md), len(dims), _Dims(*dims), _F32, _FORMAT_ANY
        )
    else:
        status = library.lib.dnnl_memory_desc_create_with_strides(
            ctypes.byref(md), len(dims), _Dims(*dims), _F32, _Dims(*strides)
        )
    _check(status, "memory descriptor")
    return md


def _activation_desc(library: _Library, shape) -> ctypes.c_void_p:
    """`[N, D, H, W, C]` (channels-last) as oneDNN's logical `(N, C, D, H, W)`."""
    n, d, h, w, c = shape
    return _memory_desc(library, (n, c, d, h, w), (d * h * w * c, 1, h * w * c, w * c, c))


def _kernel_desc(library: _Library, shape) -> ctypes.c_void_p:
    """`[KD, KH, KW, I, O]` (JAX's DHWIO) as oneDNN's logical `(O, I, KD, KH, KW)`."""
    kd, kh, kw, i, o = shape
    return _memory_desc(library, (o, i, kd, kh, kw), (1, o, kh * kw * i * o, kw * i * o, i * o))


def _desc(create, what: str, *args) -> ctypes.c_void_p:
    """A primitive descriptor made by `create(&desc, *args)`."""
    desc = ctypes.c_void_p()
    _check(create(ctypes.byref(desc), *args), what)
    return desc


def _primitive(library: _Library, desc: ctypes.c_void_p) -> ctypes.c_void_p:
    prim = ctypes.c_void_p()
    _check(library.lib.dnnl_primitive_create(ctypes.byref(prim), desc), "primitive")
    return prim


def _reorder(library: _Library, src, dst) -> tuple[ctypes.c_void_p, ctypes.c_void_p]:
    create = library.lib.dnnl_reorder_primitive_desc_create
    desc = _desc(create, "reorder", src, library.engine, dst, library.engine, library.attr)
    return _primitive(library, desc), desc


def _scratchpad(library: _Library, desc: ctypes.c_void_p) -> tuple[ctypes.c_void_p, int]:
    """The scratch memory a primitive needs: its descriptor and size in bytes (maybe 0)."""
    md = ctypes.c_void_p(library.lib.dnnl_primitive_desc_query_md(desc, _QUERY_SCRATCHPAD_MD, 0))
    return md, (library.lib.dnnl_memory_desc_get_size(md) if md else 0)


def _aligned_buffer(nbytes: int, alignment: int = 64) -> tuple[np.ndarray, int]:
    """A buffer of `nbytes` and the address of its aligned start (keep the array alive)."""
    raw = np.empty(nbytes + alignment, np.uint8)
    return raw, raw.ctypes.data + (-raw.ctypes.data) % alignment


class _Plan:
    """The primitives of one conv piece for one shape: the conv and the kernel reorder.

    `piece`: "forward" (`(x, w) -> y`), "input_grad" (`(dy, w) -> dx`) or "kernel_grad"
    (`(x, dy) -> dw`); `x_shape` is always the conv's input, `w_shape` its kernel."""

    def __init__(self, piece: str, x_shape, w_shape, strides, pads) -> None:
        library = self.library = _library()
        lib = library.lib
        self.piece = piece
        out = _out_spatial(x_shape, w_shape, strides, pads)
        self.x_md = _activation_desc(library, x_shape)
        self.y_md = _activation_desc(library, (x_shape[0], *out, w_shape[-1]))
        self.w_user_md = _kernel_desc(library, w_shape)
        w_any = _memory_desc(library, (w_shape[-1], w_shape[-2], *w_shape[:3]))
        lo, hi = _Dims(*(p[0] for p in pads)), _Dims(*(p[1] for p in pads))
        geometry = (_Dims(*strides), _Dims(0, 0, 0), lo, hi)  # strides, dilations, padding
        what = f"{piece} x{list(x_shape)} w{list(w_shape)} strides {list(strides)}"
        forward = _desc(
            lib.dnnl_convolution_forward_primitive_desc_create, what, library.engine,
            _FORWARD_TRAINING, _CONVOLUTION_DIRECT, self.x_md, w_any, None, self.y_md,
            *geometry, library.attr,
        )  # fmt: skip
        if piece == "forward":
            self.desc, query = forward, _QUERY_WEIGHTS_MD
        elif piece == "input_grad":
            self.desc, query = _desc(
                lib.dnnl_convolution_backward_data_primitive_desc_create, what, library.engine,
                _CONVOLUTION_DIRECT, self.x_md, w_any, self.y_md, *geometry, forward,
                library.attr,
            ), _QUERY_WEIGHTS_MD  # fmt: skip
        else:
            self.desc, query = _desc(
                lib.dnnl_convolution_backward_weights_primitive_desc_create, what,
                library.engine, _CONVOLUTION_DIRECT, self.x_md, w_any, None, self.y_md,
                *geometry, forward, library.attr,
            ), _QUERY_DIFF_WEIGHTS_MD  # fmt: skip
        self.w_md = ctypes.c_void_p(lib.dnnl_primitive_desc_query_md(self.desc, query, 0))
        if piece == "kernel_grad":
            self.reorder, reorder_desc = _reorder(library, self.w_md, self.w_user_md)
        else:
            self.reorder, reorder_desc = _reorder(library, self.w_user_md, self.w_md)
        self.conv = _primitive(library, self.desc)
        self.scratchpads = {
            self.conv.value: _scratchpad(library, self.desc),
            self.reorder.value: _scratchpad(library, reorder_desc),
        }
        # One buffer: the kernel in oneDNN's layout, then the larger scratchpad (the two
        # primitives run one after the other), each 64-byte aligned.
        self.w_bytes = -(-lib.dnnl_memory_desc_get_size(self.w_md) // 64) * 64
        self.buffer_bytes = self.w_bytes + max(size for _, size in self.scratchpads.values())

    def run(self, inputs: list[int], output: int) -> None:
        """Executes the piece on raw buffers in the caller's layouts."""
        buffer, start = _aligned_buffer(self.buffer_bytes)
        with self.library.lock:
            self._run(inputs, output, start, start + self.w_bytes)
        del buffer  # alive until here

    def _run(self, inputs: list[int], output: int, scratch: int, scratchpad: int) -> None:
        conv, reorder = self.conv, self.reorder
        if self.piece == "kernel_grad":
            x, dy = inputs
            args = [
                (_ARG_SRC, self.x_md, x),
                (_ARG_DIFF_DST, self.y_md, dy),
                (_ARG_DIFF_WEIGHTS, self.w_md, scratch),
            ]
            self._execute(conv, args, scratchpad)
            to_user = [(_ARG_SRC, self.w_md, scratch), (_ARG_DST, self.w_user_md, output)]
            self._execute(reorder, to_user, scratchpad)
            return
        data, w = inputs
        to_blocked = [(_ARG_SRC, self.w_user_md, w), (_ARG_DST, self.w_md, scratch)]
        self._execute(reorder, to_blocked, scratchpad)
        if self.piece == "forward":
            args = [(_ARG_SRC, self.x_md, data), (_ARG_DST, self.y_md, output)]
        else:
            args = [(_ARG_DIFF_DST, self.y_md, data), (_ARG_DIFF_SRC, self.x_md, output)]
        self._execute(conv, [*args, (_ARG_WEIGHTS, self.w_md, scratch)], scratchpad)

    def _execute(self, prim, args, scratchpad: int) -> None:
        library = self.library
        lib, stream = library.lib, library.stream()
        scratchpad_md, scratchpad_bytes = self.scratchpads[prim.value]
        if scratchpad_bytes:
            args = [*args, (_ARG_SCRATCHPAD, scratchpad_md, scratchpad)]
        mems = []
        try:
            for arg, md, pointer in args:
                mem = ctypes.c_void_p()
                _check(
                    lib.dnnl_memory_create(
                        ctypes.byref(mem), md, library.engine, ctypes.c_void_p(pointer)
                    ),
                    "memory",
                )
                mems.append((arg, mem))
            packed = (_ExecArg * len(mems))(*(_ExecArg(arg, mem) for arg, mem in mems))
            _check(lib.dnnl_primitive_execute(prim, stream, len(mems), packed), "execute")
            _check(lib.dnnl_stream_wait(stream), "stream wait")
        finally:
            for _, mem in mems:
                lib.dnnl_memory_destroy(mem)


@functools.cache
def _target(piece: str, x_shape, w_shape, strides, pads) -> str:
    """The XLA custom-call target of one piece for one shape (built and registered once)."""
    plan = _Plan(piece, x_shape, w_shape, strides, pads)
    return ffi_handler.register(
        f"vi_seg_jax_onednn_{piece}", lambda inputs, outputs: plan.run(inputs, outputs[0])
    )


def _require(dtype) -> None:
    if not available(dtype):
        raise ValueError(
            "the conv formulation 'onednn' needs the oneDNN library (the onednn-cpu-gomp "
            f"package, or {ENV_LIBRARY}), the CPU backend and float32; got {jnp.dtype(dtype).name} "
            f"on {jax.default_backend()}"
        )


def _out_spatial(x_shape, w_shape, strides, pads) -> tuple[int, ...]:
    return tuple(
        (n + lo + hi - k) // s + 1
        for n, (lo, hi), k, s in zip(x_shape[1:4], pads, w_shape[:3], strides, strict=True)
    )


def _piece(piece: str, a, b, x_shape, w_shape, strides, pads):
    """One piece as an XLA custom call on float32 operands `a`, `b`; over a device mesh each
    device runs it on its rows of the batch (`ops.partitioning`)."""
    op = _partitioned_piece(piece, x_shape[1:], w_shape, strides, pads)
    return op(a.astype(jnp.float32), b.astype(jnp.float32))


@functools.cache
def _partitioned_piece(piece: str, x_sample_shape, w_shape, strides, pads):
    def local(a, b, *, rows):
        del rows  # the rows are independent; the batch size is the operands'
        x_shape = (int(a.shape[0]), *x_sample_shape)
        out_shape = {
            "forward": (x_shape[0], *_out_spatial(x_shape, w_shape, strides, pads), w_shape[-1]),
            "input_grad": x_shape,
            "kernel_grad": w_shape,
        }[piece]
        call = jax.ffi.ffi_call(
            _target(piece, x_shape, w_shape, strides, pads),
            jax.ShapeDtypeStruct(out_shape, jnp.float32),
        )
        return call(a, b)

    if piece == "kernel_grad":  # (x, dy): the rows' contributions add up
        return partitioning.rowwise(local, (True, True), summed=True)
    return partitioning.rowwise(local, (True, False))  # (x or dy, w)


def _static(x, w, strides, pads):
    shapes = tuple(map(int, x.shape)), tuple(map(int, w.shape))
    return (*shapes, tuple(map(int, strides)), tuple((int(lo), int(hi)) for lo, hi in pads))


# --------------------------------------------------------------------------- jax entry points


def forward(x, w, pads, precision, preferred_element_type):
    """A stride-1 channels-last 3D conv (`conv_forms.FORWARD` signature) by oneDNN."""
    del precision  # oneDNN computes float32 convs in float32
    _require(x.dtype)
    static = _static(x, w, (1, 1, 1), pads)
    return _piece("forward", x, w, *static).astype(preferred_element_type or x.dtype)


def kernel_grad(x, dy, kshape, pads, precision):
    """`dL/dw` of a stride-1 channels-last 3D conv (`conv_forms.KERNEL_GRAD` signature)."""
    del precision
    _require(x.dtype)
    static = _static(x, jax.ShapeDtypeStruct(kshape, x.dtype), (1, 1, 1), pads)
    return _piece("kernel_grad", x, dy, *static).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def strided_conv(x, w, strides, pads):
    """A channels-last 3D conv with strides, all three pieces by oneDNN's strided kernels
    (the rewrite to a stride-1 conv that XLA's formulations need does 2.4x the FLOPs)."""
    _require(x.dtype)
    return _piece("forward", x, w, *_static(x, w, strides, pads)).astype(x.dtype)


def _strided_fwd(x, w, strides, pads):
    return strided_conv(x, w, strides, pads), (x, w)


def _strided_bwd(strides, pads, residuals, dy):
    x, w = residuals
    static = _static(x, w, strides, pads)
    dx = _piece("input_grad", dy, w, *static)
    dw = _piece("kernel_grad", x, dy, *static)
    return dx.astype(x.dtype), dw.astype(w.dtype)


strided_conv.defvjp(_strided_fwd, _strided_bwd)
