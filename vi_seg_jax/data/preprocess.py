"""Preprocessing of one case: brain crop, per-modality normalisation, padding.

The pipeline (method.md §1, nnU-Net practice for BraTS):

1. the brain mask is every voxel where ANY modality is non-zero (BraTS volumes are
   skull-stripped, the background is exactly 0);
2. the volume is cropped to the mask's bounding box, widened by `margin` voxels and
   clipped to the volume;
3. each modality is normalised inside the mask, by z-score (default) or min-max to
   [0, 1]; voxels outside the mask are set to 0;
4. every spatial axis is zero-padded (label 0) up to a multiple of `multiple`
   (`2**depth` of the backbone) and to at least `min_shape`, split as evenly as possible
   before/after (the extra voxel of an odd split goes after).

Unlike the paper's code, which centre-crops to a fixed shape, nothing inside the brain
box is ever cropped away, so `to_original_grid` inverts the geometry exactly: a
prediction on the preprocessed grid maps back voxel for voxel onto the source grid (and
so, with the source affine, onto the NIfTI file). The geometry is a `GridMapping`, a
JSON-serialisable record a cache manifest can store.

All functions work on any spatial rank (2D images `[X, Y, C]` as well as 3D
`[X, Y, Z, C]`); arrays are numpy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from vi_seg_jax.data.conventions import CANONICAL_CLASS_NAMES

Normalization = Literal["zscore", "minmax"]
NORMALIZATIONS: tuple[str, ...] = ("zscore", "minmax")

# Standard deviations / ranges at or below this are treated as zero (constant modality).
_EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Settings of `preprocess`.

    Attributes:
      normalization: `"zscore"` (mean 0, std 1 inside the brain mask; nnU-Net practice,
        the default) or `"minmax"` (to [0, 1] inside the brain mask; the paper's code).
      multiple: every padded spatial size is a multiple of this; use `2**depth` of the
        backbone (e.g. 8 for a U-Net with three stride-2 stages).
      margin: voxels added around the brain bounding box on each side (clipped to the
        volume).
      min_shape: optional lower bound on the padded spatial shape (one int per spatial
        axis), e.g. the patch shape, so that every patch fits.
    """

    normalization: Normalization = "zscore"
    multiple: int = 8
    margin: int = 0
    min_shape: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {list(NORMALIZATIONS)}, got {self.normalization!r}"
            )
        if not _is_int(self.multiple) or self.multiple < 1:
            raise ValueError(f"multiple must be a positive int, got {self.multiple!r}")
        if not _is_int(self.margin) or self.margin < 0:
            raise ValueError(f"margin must be a non-negative int, got {self.margin!r}")
        if self.min_shape is not None:
            min_shape = tuple(self.min_shape)
            if not min_shape or not all(_is_int(s) and s >= 1 for s in min_shape):
                raise ValueError(f"min_shape must be positive ints, got {self.min_shape!r}")
            object.__setattr__(self, "min_shape", tuple(int(s) for s in min_shape))


@dataclasses.dataclass(frozen=True)
class GridMapping:
    """Geometry from the original grid to the preprocessed grid (per spatial axis).

    The preprocessed array is `pad(original[crop_start:crop_stop], (pad_before, pad_after))`.

    Attributes:
      original_shape: spatial shape of the source volume, e.g. `(240, 240, 155)`.
      crop_start: first kept voxel per axis (inclusive).
      crop_stop: end of the kept range per axis (exclusive).
      pad_before: zeros added before the crop per axis.
      pad_after: zeros added after the crop per axis.
    """

    original_shape: tuple[int, ...]
    crop_start: tuple[int, ...]
    crop_stop: tuple[int, ...]
    pad_before: tuple[int, ...]
    pad_after: tuple[int, ...]

    def __post_init__(self):
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in fields.items():
            value = tuple(value)
            if not all(_is_int(v) for v in value):
                raise ValueError(f"GridMapping.{name} must hold ints, got {value!r}")
            object.__setattr__(self, name, tuple(int(v) for v in value))
        rank = len(self.original_shape)
        if rank == 0 or any(len(getattr(self, name)) != rank for name in fields):
            raise ValueError(f"GridMapping fields must all have one entry per axis: {fields}")
        for axis in range(rank):
            start, stop = self.crop_start[axis], self.crop_stop[axis]
            if not 0 <= start < stop <= self.original_shape[axis]:
                raise ValueError(
                    f"GridMapping axis {axis}: crop [{start}, {stop}) is not a non-empty range "
                    f"inside [0, {self.original_shape[axis]})"
                )
            if self.pad_before[axis] < 0 or self.pad_after[axis] < 0:
                raise ValueError(f"GridMapping axis {axis}: negative padding")

    @property
    def spatial_dims(self) -> int:
        return len(self.original_shape)

    @property
    def cropped_shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.crop_start, self.crop_stop, strict=True))

    @property
    def preprocessed_shape(self) -> tuple[int, ...]:
        return tuple(
            size + before + after
            for size, before, after in zip(
                self.cropped_shape, self.pad_before, self.pad_after, strict=True
            )
        )

    def to_dict(self) -> dict[str, list[int]]:
        """A JSON-serialisable dict (lists of ints)."""
        return {f.name: list(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GridMapping:
        """Inverse of `to_dict`; raises ValueError on missing or inconsistent fields."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [name for name in names if name not in data]
        if missing:
            raise ValueError(f"GridMapping dict lacks {missing}")
        return cls(**{name: tuple(data[name]) for name in names})


class Preprocessed(NamedTuple):
    """One preprocessed case (`S'` = `mapping.preprocessed_shape`)."""

    image: np.ndarray  # [*S', C] float32, normalised; 0 outside the brain mask
    label: np.ndarray | None  # [*S'] uint8 canonical classes; 0 in the padding
    mask: np.ndarray  # [*S'] bool brain mask; False in the padding
    mapping: GridMapping


def brain_mask(image: np.ndarray) -> np.ndarray:
    """Voxels where any modality is non-zero.

    Args:
      image: `[*S, C]` intensities, channels last.

    Returns:
      `[*S]` bool.
    """
    return np.any(np.asarray(image) != 0, axis=-1)


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Bounding box of the True voxels, widened by `margin` and clipped to the array.

    Args:
      mask: `[*S]` bool.
      margin: voxels added on each side.

    Returns:
      `(start, stop)`, one inclusive start and one exclusive stop per axis.

    Raises:
      ValueError: if the mask is empty.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ValueError("the image has no non-zero voxel, so there is no brain to crop to")
    start, stop = [], []
    for axis in range(mask.ndim):
        other_axes = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(np.any(mask, axis=other_axes))
        start.append(max(int(hits[0]) - margin, 0))
        stop.append(min(int(hits[-1]) + 1 + margin, mask.shape[axis]))
    return tuple(start), tuple(stop)


def padding_for(
    shape: Sequence[int], multiple: int, min_shape: Sequence[int] | None = None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Padding that brings `shape` to a multiple of `multiple` and at least `min_shape`.

    Args:
      shape: spatial shape `S`.
      multiple: target sizes are multiples of this.
      min_shape: optional lower bound on the target shape, one int per axis.

    Returns:
      `(before, after)` per axis; `after - before` is 0 or 1.
    """
    if min_shape is None:
        min_shape = (1,) * len(shape)
    if len(min_shape) != len(shape):
        raise ValueError(f"min_shape {tuple(min_shape)} does not match the rank of {tuple(shape)}")
    targets = [
        -(-max(size, lower) // multiple) * multiple
        for size, lower in zip(shape, min_shape, strict=True)
    ]
    total = [target - size for target, size in zip(targets, shape, strict=True)]
    before = tuple(t // 2 for t in total)
    after = tuple(t - b for t, b in zip(total, before, strict=True))
    return before, after


def compute_mapping(mask: np.ndarray, config: PreprocessConfig) -> GridMapping:
    """The crop and padding `preprocess` applies to a volume with this brain mask.

    Args:
      mask: `[*S]` bool brain mask (see `brain_mask`).
      config: crop margin, padding multiple and minimum shape.

    Returns:
      The `GridMapping` from `S` to the preprocessed grid.
    """
    start, stop = bounding_box(mask, config.margin)
    cropped = tuple(b - a for a, b in zip(start, stop, strict=True))
    before, after = padding_for(cropped, config.multiple, config.min_shape)
    return GridMapping(tuple(np.shape(mask)), start, stop, before, after)


def normalize(
    image: np.ndarray, mask: np.ndarray, normalization: Normalization = "zscore"
) -> np.ndarray:
    """Per-modality normalisation inside the brain mask; 0 outside it.

    Statistics are computed in float64 over the mask's voxels of each channel. A
    constant channel (std or range ≤ 1e-8) is only shifted: z-score gives 0 and
    min-max gives 0 inside the mask.

    Args:
      image: `[*S, C]` intensities.
      mask: `[*S]` bool, at least one True voxel.
      normalization: `"zscore"` or `"minmax"`.

    Returns:
      `[*S, C]` float32.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"normalization must be one of {list(NORMALIZATIONS)}, got {normalization!r}"
        )
    image = np.asarray(image)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != image.shape[:-1]:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {image.shape}")
    if not mask.any():
        raise ValueError("the brain mask is empty; cannot normalise")
    inside = image[mask].astype(np.float64)  # [N, C]
    if normalization == "zscore":
        shift = inside.mean(axis=0)
        scale = inside.std(axis=0)
    else:
        shift = inside.min(axis=0)
        scale = inside.max(axis=0) - shift
    scale = np.where(scale > _EPS, scale, 1.0)
    out = np.zeros(image.shape, dtype=np.float32)
    out[mask] = ((inside - shift) / scale).astype(np.float32)
    return out


def _on_grid(array, spatial_shape: tuple[int, ...], grid: str) -> np.ndarray:
    """`array` as a numpy array, checked to start with the `grid` grid's `spatial_shape`.

    Raises:
      ValueError: the leading dims of `array` are not `spatial_shape`.
    """
    array = np.asarray(array)
    if array.shape[: len(spatial_shape)] != spatial_shape:
        raise ValueError(
            f"array shape {array.shape} does not start with the {grid} shape {spatial_shape}"
        )
    return array


def to_preprocessed_grid(array: np.ndarray, mapping: GridMapping, *, fill=0) -> np.ndarray:
    """Applies the geometry alone (crop, then pad with `fill`); no normalisation.

    Args:
      array: `[*S, ...]` on the original grid (`S = mapping.original_shape`); any trailing
        dims and any dtype.
      mapping: the case's `GridMapping`.
      fill: value of the padding.

    Returns:
      `[*S', ...]` with `S' = mapping.preprocessed_shape`, same dtype.
    """
    array = _on_grid(array, mapping.original_shape, "original")
    rank = mapping.spatial_dims
    crop = tuple(slice(a, b) for a, b in zip(mapping.crop_start, mapping.crop_stop, strict=True))
    pad = list(zip(mapping.pad_before, mapping.pad_after, strict=True))
    pad += [(0, 0)] * (array.ndim - rank)
    return np.pad(array[crop], pad, mode="constant", constant_values=fill)


def to_original_grid(array: np.ndarray, mapping: GridMapping, *, fill=0) -> np.ndarray:
    """Maps an array on the preprocessed grid back onto the original grid exactly.

    Removes the padding and places the crop into a `fill`-valued array of the original
    shape. Voxels outside the brain box (dropped by the crop) get `fill`.

    Args:
      array: `[*S', ...]` on the preprocessed grid (`S' = mapping.preprocessed_shape`),
        e.g. a label map, probabilities `[*S', K]` or an uncertainty map; any dtype.
      mapping: the case's `GridMapping`.
      fill: value outside the crop.

    Returns:
      `[*S, ...]` with `S = mapping.original_shape`, same dtype.
    """
    array = _on_grid(array, mapping.preprocessed_shape, "preprocessed")
    rank = mapping.spatial_dims
    unpad = tuple(
        slice(before, before + size)
        for before, size in zip(mapping.pad_before, mapping.cropped_shape, strict=True)
    )
    out = np.full(mapping.original_shape + array.shape[rank:], fill, dtype=array.dtype)
    crop = tuple(slice(a, b) for a, b in zip(mapping.crop_start, mapping.crop_stop, strict=True))
    out[crop] = array[unpad]
    return out


def preprocess(
    image: np.ndarray,
    label: np.ndarray | None = None,
    config: PreprocessConfig | None = None,
) -> Preprocessed:
    """Crops to the brain, normalises each modality inside it, and pads.

    Args:
      image: `[*S, C]` float intensities, channels last (e.g. `[240, 240, 155, 4]`).
      label: optional `[*S]` canonical classes (see `conventions.py`).
      config: normalisation, padding multiple, crop margin and minimum shape;
        `PreprocessConfig()` when None.

    Returns:
      A `Preprocessed` with image `[*S', C]` float32, label `[*S']` uint8 (or None), the
      brain mask `[*S']` bool and the `GridMapping`.

    Raises:
      ValueError: the image is not finite or has no non-zero voxel; the label's shape
        differs or it holds values other than the canonical classes 0..4; or a foreground label voxel lies outside the cropped brain box (it would
        be lost; raise `config.margin` or check the case).
    """
    config = PreprocessConfig() if config is None else config
    image = np.asarray(image)
    if image.ndim < 2:
        raise ValueError(f"image must be [*spatial, C], got shape {image.shape}")
    if not np.issubdtype(image.dtype, np.number) or not np.isfinite(image).all():
        raise ValueError("image holds non-finite or non-numeric values")
    mask = brain_mask(image)
    mapping = compute_mapping(mask, config)
    crop = tuple(slice(a, b) for a, b in zip(mapping.crop_start, mapping.crop_stop, strict=True))
    cropped_mask = mask[crop]
    normalised = normalize(image[crop], cropped_mask, config.normalization)
    pad = list(zip(mapping.pad_before, mapping.pad_after, strict=True))
    out_image = np.pad(normalised, [*pad, (0, 0)], mode="constant")
    out_mask = np.pad(cropped_mask, pad, mode="constant")
    out_label = None
    if label is not None:
        out_label = _crop_label(np.asarray(label), mapping)
    return Preprocessed(out_image, out_label, out_mask, mapping)


def _crop_label(label: np.ndarray, mapping: GridMapping) -> np.ndarray:
    if label.shape != mapping.original_shape:
        raise ValueError(
            f"label shape {label.shape} differs from the image's spatial shape "
            f"{mapping.original_shape}"
        )
    if label.size and (
        label.min() < 0
        or label.max() >= len(CANONICAL_CLASS_NAMES)
        or np.any(label != np.rint(label))
    ):
        raise ValueError(
            f"label must hold canonical classes 0..{len(CANONICAL_CLASS_NAMES) - 1}, "
            f"got values {np.unique(label)[:10].tolist()}"
        )
    out = to_preprocessed_grid(label.astype(np.uint8), mapping)
    lost = int(np.count_nonzero(label)) - int(np.count_nonzero(out))
    if lost:
        raise ValueError(
            f"{lost} foreground label voxels lie outside the brain bounding box "
            "(where every modality is 0); increase the crop margin or check the case"
        )
    return out


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
