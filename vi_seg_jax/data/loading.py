"""Loading one case into arrays, after checking it is fit for use.

Checks, each failing with a one-line `DataError` that names the file and what was
expected: readable (not corrupt or truncated) NIfTI; 3D volumes (the MSD image 4D
with one channel per modality); the same shape and affine (within `affine_atol` mm)
across modalities and label; finite voxel values; label values from the release's
convention only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vi_seg_jax.data.discovery import CaseFiles
from vi_seg_jax.errors import DataError
from vi_seg_jax.io.nifti import NiftiHeaderInfo, read_nifti, read_nifti_header

AFFINE_ATOL_MM = 1e-3


@dataclasses.dataclass(frozen=True)
class CaseVolumes:
    """One case in memory.

    Attributes:
      case_id: as discovered.
      image: [X, Y, Z, C] float32, channels in the requested modality order.
      label: [X, Y, Z] uint8 canonical classes, or None.
      affine: [4, 4] voxel-to-world matrix shared by all files of the case.
      reference: the file whose header outputs should copy (the first modality).
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    reference: Path


def check_geometry(
    case: CaseFiles, modalities: Sequence[str], *, affine_atol: float = AFFINE_ATOL_MM
) -> tuple[int, int, int]:
    """Header-only checks (no voxel data read). Returns the common [X, Y, Z] shape."""
    headers = {
        path: read_nifti_header(path)
        for path in {*case.images.values(), *([case.label] if case.label else [])}
    }
    reference = headers[case.images[modalities[0]]]
    for modality in modalities:
        header = headers[case.images[modality]]
        channel = case.channel_index(modality)
        if channel is None:
            _check_spatial(header, expected="a 3D volume")
        else:
            _check_4d(header, channel)
    if case.label is not None:
        _check_spatial(headers[case.label], expected="a 3D label map")
    for path, header in headers.items():
        if header.shape[:3] != reference.shape[:3]:
            raise DataError(
                path,
                f"shape {header.shape[:3]} differs from {reference.shape[:3]} of {reference.path.name}",
            )
        if not np.allclose(header.affine, reference.affine, atol=affine_atol, rtol=0):
            gap = float(np.max(np.abs(header.affine - reference.affine)))
            raise DataError(
                path,
                f"affine differs from {reference.path.name} by up to {gap:.3g} mm "
                f"(tolerance {affine_atol:g} mm)",
            )
    return reference.shape[:3]


def _check_spatial(header: NiftiHeaderInfo, *, expected: str) -> None:
    shape = header.shape
    if len(shape) == 4 and shape[3] == 1:
        return
    if len(shape) != 3:
        raise DataError(header.path, f"expected {expected}, got shape {shape}")


def _check_4d(header: NiftiHeaderInfo, channel: int) -> None:
    if len(header.shape) != 4 or header.shape[3] <= channel:
        raise DataError(
            header.path,
            f"expected a 4D image with channel {channel} (MSD order FLAIR, T1w, T1gd, T2w), "
            f"got shape {header.shape}",
        )


def load_case(
    case: CaseFiles,
    modalities: Sequence[str],
    *,
    with_label: bool = True,
    affine_atol: float = AFFINE_ATOL_MM,
) -> CaseVolumes:
    """Validates and reads one case.

    Args:
      case: from `discover_cases`.
      modalities: canonical modalities, in channel order.
      with_label: read the label map if the case has one.
      affine_atol: largest allowed difference between affine entries, in mm.

    Returns:
      The image [X, Y, Z, C] float32 and canonical label [X, Y, Z] uint8 (or None).

    Raises:
      DataError: the first failed check, naming the file.
    """
    shape = check_geometry(case, modalities, affine_atol=affine_atol)
    channels, cache = [], {}
    for modality in modalities:
        path = case.images[modality]
        if path not in cache:
            cache[path] = read_nifti(path)
        volume = cache[path]
        channel = case.channel_index(modality)
        data = volume.data if channel is None else volume.data[..., channel]
        data = data.reshape(shape)
        _check_finite(data, path)
        channels.append(data)
    label = None
    if with_label and case.label is not None:
        label = _read_label(case, shape)
    return CaseVolumes(
        case_id=case.case_id,
        image=np.stack(channels, axis=-1).astype(np.float32),
        label=label,
        affine=cache[case.images[modalities[0]]].affine,
        reference=case.images[modalities[0]],
    )


def _check_finite(data: np.ndarray, path: Path) -> None:
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise DataError(path, f"{bad} voxels are NaN or Inf; expected finite intensities")


def _read_label(case: CaseFiles, shape: tuple[int, int, int]) -> np.ndarray:
    path = case.label
    raw = read_nifti(path, dtype=np.float32).data.reshape(shape)
    _check_finite(raw, path)
    convention = case.convention
    unexpected = convention.unexpected_values(raw)
    if unexpected:
        shown = ", ".join(f"{v:g}" for v in unexpected[:8])
        raise DataError(
            path,
            f"unexpected label values {shown}; {convention.name} labels are "
            f"{list(convention.release_labels)}",
        )
    return convention.to_canonical(raw)
