"""Reading and writing NIfTI volumes with their affine and header.

Arrays keep nibabel's voxel order (i, j, k[, channel]); no reorientation happens
unless asked for, so an output written with the source affine and header lands
exactly on the source grid in 3D Slicer or ITK-SNAP. Every write goes to a
temporary file in the destination folder and is renamed into place, so a crash
never leaves a half-written volume under the final name.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import tempfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from vi_seg_jax.errors import DataError
from vi_seg_jax.io.folders import new_file_mode

NIFTI_SUFFIXES = (".nii.gz", ".nii")

# Errors nibabel, gzip and zlib raise on truncated or corrupt files.
_READ_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    zlib.error,
    gzip.BadGzipFile,
    nib.filebasedimages.ImageFileError,
)


@dataclasses.dataclass(frozen=True)
class NiftiHeaderInfo:
    """What validation needs to know about a file without reading its voxels."""

    path: Path
    shape: tuple[int, ...]
    affine: np.ndarray  # [4, 4] float64, voxel index -> scanner mm
    zooms: tuple[float, ...]
    header: nib.Nifti1Header | None = None  # to copy into outputs on the same grid


@dataclasses.dataclass(frozen=True)
class NiftiVolume:
    """A volume's voxels together with the geometry needed to write results back."""

    data: np.ndarray  # [X, Y, Z] or [X, Y, Z, C]
    affine: np.ndarray  # [4, 4] float64
    header: nib.Nifti1Header
    path: Path | None = None


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | os.PathLike) -> str:
    """File name without `.nii` / `.nii.gz`."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _load(path: Path) -> nib.Nifti1Image:
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        image = nib.load(path)
    except nib.filebasedimages.ImageFileError:
        raise DataError(
            path, "not a readable NIfTI file (unrecognised or truncated header)"
        ) from None
    except _READ_ERRORS as error:
        raise DataError(path, f"not a readable NIfTI file ({error})") from None
    if not isinstance(image, nib.Nifti1Image):
        raise DataError(path, f"expected a NIfTI-1/2 image, got {type(image).__name__}")
    return image


def read_nifti_header(path: str | os.PathLike) -> NiftiHeaderInfo:
    """Reads shape and affine only (cheap: no voxel data is decompressed)."""
    path = Path(path)
    image = _load(path)
    return NiftiHeaderInfo(
        path=path,
        shape=tuple(int(s) for s in image.shape),
        affine=np.asarray(image.affine, dtype=np.float64),
        zooms=tuple(float(z) for z in image.header.get_zooms()),
        header=image.header,
    )


def read_nifti(path: str | os.PathLike, *, dtype=np.float32) -> NiftiVolume:
    """Reads a NIfTI volume.

    Args:
      path: a `.nii` or `.nii.gz` file.
      dtype: dtype of the returned array (scaling slope/intercept applied).

    Returns:
      The voxels, the affine and a copy of the header.

    Raises:
      DataError: the file is missing, corrupt or truncated (the message names it).
    """
    path = Path(path)
    image = _load(path)
    try:
        data = np.asarray(image.get_fdata(dtype=np.float32), dtype=dtype)
    except _READ_ERRORS as error:
        raise DataError(path, f"corrupt or truncated NIfTI data ({error})") from None
    return NiftiVolume(
        data=data,
        affine=np.asarray(image.affine, dtype=np.float64),
        header=image.header.copy(),
        path=path,
    )


def write_nifti(
    path: str | os.PathLike,
    data: np.ndarray,
    *,
    affine: np.ndarray,
    header: nib.Nifti1Header | None = None,
    kind: str = "float",
) -> Path:
    """Writes `data` atomically with the given affine and (source) header.

    Args:
      path: destination ending in `.nii.gz` or `.nii`.
      data: [X, Y, Z] or [X, Y, Z, C] array.
      affine: [4, 4] voxel-to-world matrix, normally the source image's.
      header: the source header; its geometry (qform/sform codes, units) is kept and
        its data type and scaling are replaced to suit `kind`.
      kind: `"label"` stores uint8 integers (int16 if values exceed 255),
        `"float"` stores float32 without scaling.

    Returns:
      The final path.
    """
    path = Path(path)
    if not is_nifti(path):
        raise ValueError(f"{path}: output file must end in .nii.gz or .nii")
    if kind == "label":
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise ValueError(f"{path}: label maps must hold integers")
        out_dtype = (
            np.uint8 if data.min(initial=0) >= 0 and data.max(initial=0) <= 255 else np.int16
        )
        array = rounded.astype(out_dtype)
    elif kind == "float":
        array = np.asarray(data, dtype=np.float32)
    else:
        raise ValueError(f"kind must be 'label' or 'float', got {kind!r}")

    header = header.copy() if header is not None else nib.Nifti1Header()
    header.set_data_dtype(array.dtype)
    header.set_slope_inter(1.0, 0.0)
    image = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64), header)
    image.header.set_xyzt_units(*header.get_xyzt_units())

    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if str(path).endswith(".nii.gz") else ".nii"
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent
    )
    os.fchmod(fd, new_file_mode())  # mkstemp's file is owner-only
    os.close(fd)
    try:
        nib.save(image, tmp_name)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path
