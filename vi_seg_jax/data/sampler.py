"""Random patches from preprocessed volumes, with nnU-Net-style foreground oversampling.

Each item of a batch is drawn independently:

* with probability `foreground_fraction` it is *forced*: a case is chosen uniformly among
  the cases that have foreground (label > 0), and the patch centre is a uniformly chosen
  foreground voxel of that case;
* otherwise a case is chosen uniformly among all cases and the centre uniformly over
  all voxels of its volume.

A patch is `patch_shape` voxels around its centre (start = centre - patch // 2), shifted
so that it stays inside the volume; the centre voxel always remains inside the patch, so
a forced patch always holds foreground. Along an axis where the volume is smaller than
the patch, the volume sits in the middle of the patch and the rest is zero (label 0).

A 3-int `patch_shape` gives 3D patches; a 2-int one gives 2D patches: the axial slice
(fixed z) through the centre, cropped in-plane to `patch_shape`.

Unbiased weights (`unbiased_weights=True`). Oversampling and border shifts make some voxels
far likelier to be seen than others, so (N/B)·Σ over a batch over-weights tumour relative to
the KL. Each batch then also carries per-voxel weights w(v) = 1 / (N·π(v)), where π(v) is the
probability that one drawn patch covers voxel v and N = V / P (training voxels over patch
voxels, `bayes.elbo.num_data_for_patches`): for any per-voxel loss ℓ,
E[(N/B)·Σ_b Σ_{v ∈ patch b} w(v)·ℓ(v)] = Σ_v ℓ(v), the full-data sum (Horvitz–Thompson).
π(v) = (1 − p)/C · Π_axes cov(x_a) + p/C_fg · K(v)/F_c, where cov is the chance that a uniformly
centred patch covers coordinate x_a, F_c the case's foreground voxels and K(v) how many of them
centre a patch that covers v. Zero padding gets weight 0 (it is not data). The weights are
computed per drawn patch from the foreground list, so they cost no memory per case.

Randomness comes only from the JAX key passed in, so a batch is a pure function of
`(volumes, settings, key)`. `batch_at(key, i)` folds the batch index into the key, so a
training loop can resume its data stream from the integer `i` stored in a checkpoint.

Volumes may be numpy memmaps: only the patch region of each is read per item (the label
is read in full once, at construction, to list its foreground voxels).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import numpy as np


class Batch(NamedTuple):
    """A batch of patches (numpy arrays) and where they came from. `P` = patch shape."""

    images: np.ndarray  # [B, *P, C] float32
    labels: np.ndarray  # [B, *P] uint8 canonical classes
    case_indices: np.ndarray  # [B] int64, index into the sampler's volumes
    centres: np.ndarray  # [B, 3] int64, the drawn centre voxel (x, y, z)
    starts: np.ndarray  # [B, 3] int64, volume index of the patch's first voxel (may be < 0
    #   where the volume is smaller than the patch and the patch is zero-padded); for 2D
    #   patches starts[:, 2] is the slice index
    forced_foreground: np.ndarray  # [B] bool, item was forced to centre on foreground
    weights: np.ndarray | None = None  # [B, *P] float32 unbiased voxel weights, or None


class PatchSampler:
    """Draws batches of patches from a fixed list of volumes.

    The sampler holds no mutable state: every draw is a pure function of the key.

    Args:
      images: per case `[X, Y, Z, C]` float intensities (numpy arrays or memmaps); every
        case has the same `C`.
      labels: per case `[X, Y, Z]` canonical classes (uint8), same spatial shape as the image.
      patch_shape: `(px, py, pz)` for 3D patches or `(px, py)` for 2D axial patches.
      batch_size: items per batch `B`.
      foreground_fraction: probability `p` in [0, 1] that an item is forced to centre on
        a foreground voxel (nnU-Net uses 0.33).
      unbiased_weights: also return the per-voxel weights that make the batch an unbiased
        estimate of the full-data sum (module docstring).

    Raises:
      ValueError: on empty or mismatched inputs, bad settings, or `p > 0` when no case
        has foreground.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
        *,
        patch_shape: Sequence[int],
        batch_size: int,
        foreground_fraction: float = 0.33,
        unbiased_weights: bool = False,
    ):
        self.images = tuple(images)
        self.labels = tuple(labels)
        self.patch_shape = _check_patch_shape(patch_shape)
        self.batch_size = _check_batch_size(batch_size)
        self.foreground_fraction = _check_fraction(foreground_fraction)
        self.num_channels = _check_volumes(self.images, self.labels)
        self.unbiased_weights = bool(unbiased_weights)
        # Flat (C-order) indices of the foreground voxels of each case, computed once.
        self.foreground_indices = tuple(
            np.flatnonzero(np.asarray(label) > 0).astype(np.int64) for label in self.labels
        )
        self.foreground_cases = np.array(
            [i for i, fg in enumerate(self.foreground_indices) if fg.size], dtype=np.int64
        )
        if self.foreground_fraction > 0 and self.foreground_cases.size == 0:
            raise ValueError(
                f"foreground_fraction={self.foreground_fraction} but no case has foreground "
                "(label > 0); use foreground_fraction=0"
            )

    @property
    def num_cases(self) -> int:
        return len(self.images)

    @property
    def spatial_dims(self) -> int:
        """2 for axial-slice patches, 3 for volume patches."""
        return len(self.patch_shape)

    def sample_batch(self, key: jax.Array, rows: slice | None = None) -> Batch:
        """Draws one batch; the same key always gives the same batch.

        Args:
          key: a typed JAX key (`jax.random.key(seed)`), scalar. A legacy raw
            `uint32[2]` key (`jax.random.PRNGKey`) is accepted too and gives the same
            batch as the typed key with the same key data.
          rows: only these rows of the batch (one process's share of a multi-process
            batch); the draw is the whole batch's, so rows are the same whoever reads them.

        Returns:
          A `Batch` of `images [B, *P, C]` float32, `labels [B, *P]` uint8 and the
          draw's provenance.
        """
        rng = _numpy_rng(key)
        cases, centres, forced = self._draw_centres(rng)
        rows = slice(0, self.batch_size) if rows is None else rows
        cases, centres, forced = cases[rows], centres[rows], forced[rows]
        size = len(cases)
        extent = self._extent()
        images = np.zeros((size, *extent, self.num_channels), dtype=np.float32)
        labels = np.zeros((size, *extent), dtype=np.uint8)
        starts = np.zeros((size, 3), dtype=np.int64)
        for item in range(size):
            case = int(cases[item])
            shape = self.labels[case].shape
            starts[item] = patch_start(centres[item], extent, shape)
            images[item] = extract_patch(self.images[case], starts[item], extent)
            labels[item] = extract_patch(self.labels[case], starts[item], extent)
        weights = None
        if self.unbiased_weights:
            weights = np.stack(
                [self.voxel_weights(int(c), t) for c, t in zip(cases, starts, strict=True)]
            )
        if self.spatial_dims == 2:
            images, labels = images[:, :, :, 0], labels[:, :, :, 0]
            weights = None if weights is None else weights[:, :, :, 0]
        return Batch(images, labels, cases, centres, starts, forced, weights)

    def batch_at(self, key: jax.Array, index: int, rows: slice | None = None) -> Batch:
        """Batch number `index` of the stream `iterate_batches(key)`: `fold_in(key, index)`."""
        return self.sample_batch(jax.random.fold_in(_as_typed_key(key), index), rows)

    def iterate_batches(
        self, key: jax.Array, num_batches: int | None = None, *, start: int = 0
    ) -> Iterator[Batch]:
        """Yields `batch_at(key, i)` for `i = start, start + 1, ...`.

        Args:
          key: the data stream's key (typed; see `sample_batch`).
          num_batches: how many batches; None for an endless stream.
          start: index of the first batch, e.g. the step stored in a checkpoint, so that a
            resumed run sees exactly the batches the interrupted one would have.

        Yields:
          `Batch` after `Batch`.
        """
        if num_batches is not None and num_batches < 0:
            raise ValueError(f"num_batches must be >= 0, got {num_batches}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        key = _as_typed_key(key)
        index = start
        while num_batches is None or index < start + num_batches:
            yield self.batch_at(key, index)
            index += 1

    def voxel_weights(self, case: int, start: Sequence[int]) -> np.ndarray:
        """w(v) = 1 / (N·π(v)) over the patch of `case` at `start` (3D extent), 0 on padding."""
        extent = self._extent()
        shape = self.labels[case].shape
        num_data = sum(label.size for label in self.labels) / float(np.prod(extent))
        uniform = np.ones(extent)
        for axis, (t, p, s) in enumerate(zip(start, extent, shape, strict=True)):
            along = np.zeros(p)
            inside = slice(max(-t, 0), min(s - t, p))
            along[inside] = _uniform_coverage(s, p)[t + inside.start : t + inside.stop]
            uniform *= along.reshape([-1 if a == axis else 1 for a in range(3)])
        coverage = (1.0 - self.foreground_fraction) / self.num_cases * uniform
        foreground = self.foreground_indices[case]
        if self.foreground_fraction > 0 and foreground.size:
            covering = _covering_count(foreground, start, extent, shape)
            share = self.foreground_fraction / self.foreground_cases.size / foreground.size
            coverage = coverage + share * covering
        in_volume = _in_volume(start, extent, shape)
        with np.errstate(divide="ignore"):
            weights = np.where(in_volume, 1.0 / (num_data * coverage), 0.0)
        return weights.astype(np.float32)

    def case_weights(self, case: int) -> np.ndarray:
        """w(v) for every voxel of `case` [X, Y, Z]: 1 / w is how many times more (or less)
        the voxel counts in the unweighted data term than its share of the data."""
        extent, shape = self._extent(), self.labels[case].shape
        weights = np.zeros(shape, np.float32)
        tiles = [range(0, s, p) if s >= p else [0] for s, p in zip(shape, extent, strict=True)]
        for corner in itertools.product(*tiles):
            # Tiles are shifted inward at the far edges, like the patches themselves.
            start = [
                min(c, s - p) if s >= p else -((p - s) // 2)
                for c, s, p in zip(corner, shape, extent, strict=True)
            ]
            tile = self.voxel_weights(case, start)
            lows = [max(t, 0) for t in start]
            highs = [min(t + p, n) for t, p, n in zip(start, extent, shape, strict=True)]
            where = tuple(slice(lo, hi) for lo, hi in zip(lows, highs, strict=True))
            inside = tuple(
                slice(lo - t, hi - t) for lo, hi, t in zip(lows, highs, start, strict=True)
            )
            weights[where] = tile[inside]
        return weights

    def _extent(self) -> tuple[int, int, int]:
        """Patch extent in the volume: 3D patches as given, 2D patches one slice thick."""
        if self.spatial_dims == 2:
            return (*self.patch_shape, 1)
        return self.patch_shape

    def _draw_centres(self, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        """Cases `[B]`, centres `[B, 3]` and forced flags `[B]` of one batch.

        The draws happen in a fixed order and with fixed sizes, so a key always maps to
        the same batch.
        """
        size = self.batch_size
        forced = rng.random(size) < self.foreground_fraction
        any_case = rng.integers(self.num_cases, size=size)
        if self.foreground_cases.size:
            fg_case = self.foreground_cases[rng.integers(self.foreground_cases.size, size=size)]
        else:  # foreground_fraction == 0, so no item is forced
            fg_case = any_case
        cases = np.where(forced, fg_case, any_case).astype(np.int64)
        voxels = np.array([self.labels[c].size for c in cases], dtype=np.int64)
        counts = np.array(
            [
                self.foreground_indices[c].size if f else 1
                for c, f in zip(cases, forced, strict=True)
            ],
            dtype=np.int64,
        )
        uniform_voxel = rng.integers(0, voxels)
        fg_position = rng.integers(0, counts)
        centres = np.zeros((size, 3), dtype=np.int64)
        for item, case in enumerate(cases):
            flat = (
                self.foreground_indices[case][fg_position[item]]
                if forced[item]
                else uniform_voxel[item]
            )
            centres[item] = np.unravel_index(flat, self.labels[case].shape)
        return cases, centres, forced


@functools.lru_cache(maxsize=256)
def _uniform_coverage(size: int, extent: int) -> np.ndarray:
    """[size] chance that the patch around a uniformly drawn centre covers each coordinate."""
    if size <= extent:
        return np.ones(size)
    starts = np.clip(np.arange(size) - extent // 2, 0, size - extent)
    covering = np.zeros(size + 1)
    np.add.at(covering, starts, 1.0)
    np.add.at(covering, starts + extent, -1.0)
    return np.cumsum(covering)[:size] / size


def _covering_count(
    foreground: np.ndarray, start: Sequence[int], extent: Sequence[int], shape: Sequence[int]
) -> np.ndarray:
    """[*extent] how many foreground voxels of the case centre a patch covering each voxel."""
    centres = np.stack(np.unravel_index(foreground, shape), axis=-1)
    starts = np.stack(
        [
            np.clip(centres[:, a] - p // 2, 0, s - p) if s >= p else np.full(len(centres), t)
            for a, (t, p, s) in enumerate(zip(start, extent, shape, strict=True))
        ],
        axis=-1,
    )
    # Patch-local range each of those patches covers, as a difference array summed up.
    lo = np.clip(starts - np.asarray(start), 0, np.asarray(extent))
    hi = np.clip(starts - np.asarray(start) + np.asarray(extent), 0, np.asarray(extent))
    overlaps = np.all(hi > lo, axis=-1)
    lo, hi = lo[overlaps], hi[overlaps]
    counts = np.zeros([p + 1 for p in extent])
    for corner in range(8):
        picks = [(corner >> a) & 1 for a in range(3)]
        index = tuple(np.where(pick, hi[:, a], lo[:, a]) for a, pick in enumerate(picks))
        np.add.at(counts, index, (-1.0) ** sum(picks))
    for axis in range(3):
        counts = np.cumsum(counts, axis=axis)
    return counts[tuple(slice(0, p) for p in extent)]


def _in_volume(start: Sequence[int], extent: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """[*extent] which voxels of the patch lie inside the volume (the rest is padding)."""
    inside = np.ones(extent, bool)
    for axis, (t, p, s) in enumerate(zip(start, extent, shape, strict=True)):
        along = (np.arange(p) + t >= 0) & (np.arange(p) + t < s)
        inside &= along.reshape([-1 if a == axis else 1 for a in range(3)])
    return inside


def patch_start(
    centre: Sequence[int], extent: Sequence[int], shape: Sequence[int]
) -> tuple[int, ...]:
    """First voxel of the patch around `centre`, shifted to stay inside the volume.

    Args:
      centre: voxel index per axis.
      extent: patch size per axis.
      shape: volume size per axis.

    Returns:
      Start index per axis. Along an axis where the volume is smaller than the patch, the
      start is negative so that the volume is centred in the (zero-padded) patch.
    """
    starts = []
    for c, p, s in zip(centre, extent, shape, strict=True):
        if s >= p:
            starts.append(int(np.clip(int(c) - p // 2, 0, s - p)))
        else:
            starts.append(-((p - s) // 2))
    return tuple(starts)


def extract_patch(volume: np.ndarray, start: Sequence[int], extent: Sequence[int]) -> np.ndarray:
    """`volume[start : start + extent]` along the leading axes, zero outside the volume.

    Only the overlapping region is read, so a memmap is never loaded in full.

    Args:
      volume: `[*S, ...]` array or memmap (trailing dims, e.g. channels, are kept).
      start: first index per spatial axis (may be negative or run past the end).
      extent: patch size per spatial axis.

    Returns:
      `[*extent, ...]` copy with the volume's dtype.
    """
    rank = len(extent)
    out = np.zeros((*extent, *volume.shape[rank:]), dtype=volume.dtype)
    src, dst = [], []
    for a, p, s in zip(start, extent, volume.shape[:rank], strict=True):
        lo, hi = max(int(a), 0), min(int(a) + p, s)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(a), hi - int(a)))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def _numpy_rng(key: jax.Array) -> np.random.Generator:
    """A numpy generator seeded by the key's data (uint32 words)."""
    data = np.asarray(jax.random.key_data(_as_typed_key(key)))
    return np.random.default_rng(data.astype(np.uint64).ravel())


def _as_typed_key(key: jax.Array) -> jax.Array:
    """Accepts a scalar typed key, or a legacy raw `uint32[2]` key (wrapped)."""
    if isinstance(key, jax.Array | np.ndarray) and jax.dtypes.issubdtype(
        key.dtype, jax.dtypes.prng_key
    ):
        if key.shape != ():
            raise TypeError(f"expected one scalar key, got a key array of shape {key.shape}")
        return key
    raw = np.asarray(key)
    if raw.dtype == np.uint32 and raw.shape == (2,):
        return jax.random.wrap_key_data(raw)
    raise TypeError(
        "expected a JAX key from jax.random.key(seed) (or a legacy uint32[2] PRNGKey), "
        f"got {type(key).__name__} with dtype {getattr(raw, 'dtype', None)} and shape "
        f"{getattr(raw, 'shape', None)}"
    )


def _check_patch_shape(patch_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(patch_shape)
    if len(shape) not in (2, 3) or not all(
        isinstance(s, int | np.integer) and not isinstance(s, bool) and s >= 1 for s in shape
    ):
        raise ValueError(
            f"patch_shape must be 3 positive ints (3D) or 2 (2D axial), got {patch_shape!r}"
        )
    return tuple(int(s) for s in shape)


def _check_batch_size(batch_size: int) -> int:
    if not isinstance(batch_size, int | np.integer) or isinstance(batch_size, bool):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return int(batch_size)


def _check_fraction(fraction: float) -> float:
    fraction = float(fraction)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"foreground_fraction must be in [0, 1], got {fraction}")
    return fraction


def _check_volumes(images: tuple[np.ndarray, ...], labels: tuple[np.ndarray, ...]) -> int:
    """Validates shapes; returns the common number of channels."""
    if not images:
        raise ValueError("PatchSampler needs at least one volume")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    channels = set()
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        if image.ndim != 4 or label.ndim != 3:
            raise ValueError(
                f"case {i}: expected image [X, Y, Z, C] and label [X, Y, Z], got shapes "
                f"{image.shape} and {label.shape}"
            )
        if image.shape[:3] != label.shape:
            raise ValueError(
                f"case {i}: image shape {image.shape} and label shape {label.shape} differ"
            )
        if label.size == 0:
            raise ValueError(f"case {i}: empty volume of shape {label.shape}")
        channels.add(image.shape[-1])
    if len(channels) != 1:
        raise ValueError(f"cases have different channel counts {sorted(channels)}")
    return channels.pop()
