"""An XLA custom-call target from a Python function, through XLA's typed FFI and `ctypes`.

`jax.pure_callback` copies every operand into a new array and the result back into XLA's
buffer; for the convolutions of `vi_seg_jax.ops.onednn` that cost a third of the call. A
typed FFI handler (the C ABI of `xla/ffi/api/c_api.h`, API 0.x, as `jax.ffi` documents it)
receives XLA's own buffers instead, so a library can read its operands and write its result
in place. The handler is a `ctypes` callback, so nothing is compiled.
"""

from __future__ import annotations

import ctypes
import itertools
from collections.abc import Callable

import jax

_METADATA_EXTENSION = 1
_STAGE_EXECUTE = 3
_ERROR_INTERNAL = 13
_API_VERSION = (0, 1)  # the oldest FFI API with these structs: every newer XLA accepts it

# Every FFI struct starts with these two fields.
_HEADER = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p)]
_PTR = ctypes.c_void_p


def _struct(name: str, fields, header: bool = True) -> type[ctypes.Structure]:
    return type(name, (ctypes.Structure,), {"_fields_": (_HEADER if header else []) + fields})


_ExtensionBase = _struct(
    "XLA_FFI_Extension_Base",
    [("struct_size", ctypes.c_size_t), ("type", ctypes.c_int), ("next", _PTR)],
    False,
)
_List = _struct(  # XLA_FFI_Args and XLA_FFI_Rets
    "XLA_FFI_List", [("size", ctypes.c_int64), ("types", _PTR), ("items", ctypes.POINTER(_PTR))]
)
_Attrs = _struct(
    "XLA_FFI_Attrs", [("size", ctypes.c_int64), ("types", _PTR), ("names", _PTR), ("values", _PTR)]
)
_CallFrame = _struct(
    "XLA_FFI_CallFrame",
    [
        ("api", _PTR),
        ("ctx", _PTR),
        ("stage", ctypes.c_int),
        ("args", _List),
        ("rets", _List),
        ("attrs", _Attrs),
        ("future", _PTR),
    ],
)
_Buffer = _struct("XLA_FFI_Buffer", [("dtype", ctypes.c_int), ("data", _PTR)])
_ApiVersion = _struct("XLA_FFI_Api_Version", [("major", ctypes.c_int), ("minor", ctypes.c_int)])
_Metadata = _struct(
    "XLA_FFI_Metadata",
    [
        ("struct_size", ctypes.c_size_t),
        ("api_version", _ApiVersion),
        ("traits", ctypes.c_uint32),
        ("state_type_id", ctypes.c_int64),
    ],
    False,
)
_MetadataExtension = _struct(
    "XLA_FFI_Metadata_Extension",
    [("base", _ExtensionBase), ("metadata", ctypes.POINTER(_Metadata))],
    False,
)
# The leading fields of XLA_FFI_Api, up to the function that creates an error.
_Api = _struct(
    "XLA_FFI_Api", [("api_version", _ApiVersion), ("internal_api", _PTR), ("error_create", _PTR)]
)
_ErrorCreateArgs = _struct(
    "XLA_FFI_Error_Create_Args", [("message", ctypes.c_char_p), ("errc", ctypes.c_int)]
)
_Handler = ctypes.CFUNCTYPE(_PTR, ctypes.POINTER(_CallFrame))
_ErrorCreate = ctypes.CFUNCTYPE(_PTR, ctypes.POINTER(_ErrorCreateArgs))

# Handlers XLA holds pointers to: never collected.
_REGISTERED: list = []
_COUNTER = itertools.count()


def _data_pointers(items: _List) -> list[int]:
    buffers = (ctypes.cast(items.items[i], ctypes.POINTER(_Buffer)) for i in range(items.size))
    return [b.contents.data for b in buffers]


def _error(api_pointer: int, message: str) -> int:
    api = ctypes.cast(api_pointer, ctypes.POINTER(_Api)).contents
    args = _ErrorCreateArgs(
        ctypes.sizeof(_ErrorCreateArgs), None, message.encode(), _ERROR_INTERNAL
    )
    return _ErrorCreate(api.error_create)(ctypes.byref(args))


def register(prefix: str, run: Callable[[list[int], list[int]], None]) -> str:
    """Registers `run(input_pointers, output_pointers)` as a CPU custom-call target and
    returns its name, for `jax.ffi.ffi_call`. `run` is called on XLA's buffers (row-major,
    as the call's shapes say); an exception it raises fails the computation with its text."""

    def handle(frame_pointer):
        frame = frame_pointer.contents
        extension = ctypes.cast(frame.extension_start, ctypes.POINTER(_ExtensionBase))
        if extension and extension.contents.type == _METADATA_EXTENSION:
            # XLA asks which FFI API the handler was written for.
            metadata = ctypes.cast(extension, ctypes.POINTER(_MetadataExtension))
            metadata.contents.metadata.contents.api_version = _ApiVersion(
                ctypes.sizeof(_ApiVersion), None, *_API_VERSION
            )
            return None
        if frame.stage != _STAGE_EXECUTE:
            return None
        try:
            run(_data_pointers(frame.args), _data_pointers(frame.rets))
        except Exception as error:  # an exception cannot cross into C: hand it to XLA
            return _error(frame.api, f"{prefix}: {error}")
        return None

    handler = _Handler(handle)
    name = f"{prefix}_{next(_COUNTER)}"
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform="cpu")
    _REGISTERED.append(handler)
    return name
