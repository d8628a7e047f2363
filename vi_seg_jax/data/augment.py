"""On-device data augmentation for BraTS patches (nnU-Net / MONAI style), in pure JAX.

Every function here is a pure function of a typed JAX key and arrays, with no NumPy RNG
and no host callbacks, so augmentation runs inside the jitted training step, on the
device, and the same key always gives the same batch. At the top of a jitted step::

    aug_key, step_key = jax.random.split(step_key)
    images, labels = augment_batch(aug_key, images, labels, get_augmentation("default"))

`get_augmentation("none")` is None, for which `augment_batch` returns its inputs. The
config is static (a frozen, hashable dataclass): close over it, or mark it static if
`augment_batch` itself is jitted. With the sampler's unbiased voxel weights, pass them
too (`images, labels, weights = augment_batch(..., weights)`): they follow their voxels,
and voxels read from outside the patch get weight 0, so the Horvitz-Thompson estimate
stays unbiased only up to the (small) share of voxels moved in or out of the patch.

Each item of the batch gets its own key and independent draws. Per item:

1. **One spatial transform**, the composite mirror ∘ rotation ∘ scale ∘ elastic, built as
   a single sampling grid: output voxel `x` reads the input at
   `p(x) = c + Rᵀ F (x − c) / s + e(x)`, where `c` is the patch centre, `F` a diagonal of
   ±1 (mirroring, p per axis), `R` a rotation (uniform angles about each axis in 3D, the
   in-plane angle in 2D), `s` an isotropic zoom factor (`s > 1` magnifies the content) and
   `e` a smooth random displacement field (a cubic B-spline of Gaussian control points
   every `elastic_spacing` voxels, scaled to a standard deviation in voxels). Positive
   angles rotate the content from the lower towards the higher axis of the plane
   (`np.rot90(..., axes=(0, 1))` for 2D at 90°).
   The image is resampled with linear interpolation and the label (and the optional
   voxel weights) with nearest neighbour, at the same coordinates, so label values are
   never interpolated. Voxels read from outside the patch get image 0, label 0
   (background) and weight 0: BraTS images are skull-stripped and normalised with an
   exactly-0 background and the sampler zero-pads the same way (weight 0: padding is not
   data), so a constant 0 is the truth outside, whereas `mode="nearest"` would smear edge
   tumour voxels outwards while the label says background.
   When the config can draw only mirroring, the transform is a pure flip with no
   resampling; otherwise every item is resampled (an undrawn transform is an identity
   grid: at integer coordinates linear interpolation returns the voxel exactly), because
   under `vmap` a `lax.cond` per item evaluates both branches anyway.
2. **Intensity transforms**, on the image only: gamma, then per-channel multiplicative
   scale `x ↦ a·x`, additive shift `x ↦ x + b`, and additive Gaussian noise (one std per
   item). Gamma, per channel: `x ↦ ((x − m)/(M − m))^γ · (M − m) + m`, where `m` and `M`
   are the channel's min and max over the item's source patch, widened to include 0 (the
   fill value). Each transform is drawn once per item with its probability; the values
   are per channel where the transform is.
   nnU-Net applies gamma last and normalises by the transformed patch's own range;
   normalising by the source range (which bounds the resampled values) and applying gamma
   first keeps the whole intensity chain one elementwise pass over the resampled image: a
   reduction over it would make XLA recompute the interpolation in every consumer.

Cost. Interpolation does not call `jax.scipy.ndimage.map_coordinates` per channel: the
corner indices and weights are computed once per item and each of the 2^d corner gathers
reads all `C` channels of a voxel at once (2.5× faster at `4 × 32³ × 4` on a CPU); the
result equals `map_coordinates(order=1, mode="constant")` channel by channel (tested).
All random scalars of an item come from one RNG call and are materialised once (see
`_materialise`). Transforms whose probability is 0 are not traced at all.

References: Isensee et al., nnU-Net, Nature Methods 18 (2021), supplementary note on data
augmentation (probabilities and ranges of the "default" preset); MONAI's BraTS
segmentation tutorial (`RandFlipd`, `RandScaleIntensityd`, `RandShiftIntensityd`; the
"light" preset).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import operator
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Range = tuple[float, float]

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the augmentations (module docstring).

    Every probability defaults to 0, so `AugmentConfig(rotation_p=1.0)` draws only
    rotations, with nnU-Net's ranges. Ranges `(low, high)` are sampled uniformly.
    Spatial axes are `(x, y, z)` = `(0, 1, 2)`; 2D patches are axial slices, so for them
    the `z` entries of per-axis fields are ignored except the in-plane rotation.

    Attributes:
      mirror_p: probability of flipping each spatial axis `(x, y, z)`, independently.
      rotation_p: probability that an item is rotated.
      rotation_degrees: angle range in degrees about each axis `(x, y, z)`; 2D uses only
        the `z` (in-plane) range. nnU-Net uses ±30° per axis in 3D and ±180° in 2D.
      scale_p: probability of an isotropic zoom.
      scale_range: zoom factor range; `s > 1` magnifies the content.
      elastic_p: probability of an elastic deformation.
      elastic_amplitude: range of the displacement's standard deviation, in voxels (the
        same at every voxel and along every axis).
      elastic_spacing: distance between control points of the displacement field, in
        voxels (larger is smoother).
      gamma_p: probability of a gamma transform (per-channel gammas).
      gamma_range: gamma exponent range (positive).
      intensity_scale_p: probability of a multiplicative intensity scale.
      intensity_scale_range: per-channel factor range.
      intensity_shift_p: probability of an additive intensity shift.
      intensity_shift_range: per-channel offset range (in normalised intensity units).
      noise_p: probability of additive Gaussian noise.
      noise_std_range: noise standard deviation range (non-negative).
    """

    mirror_p: tuple[float, float, float] = (0.0, 0.0, 0.0)
    rotation_p: float = 0.0
    rotation_degrees: tuple[Range, Range, Range] = ((-30.0, 30.0),) * 3
    scale_p: float = 0.0
    scale_range: Range = (0.7, 1.4)
    elastic_p: float = 0.0
    elastic_amplitude: Range = (0.0, 3.0)
    elastic_spacing: int = 12
    gamma_p: float = 0.0
    gamma_range: Range = (0.7, 1.5)
    intensity_scale_p: float = 0.0
    intensity_scale_range: Range = (0.75, 1.25)
    intensity_shift_p: float = 0.0
    intensity_shift_range: Range = (-0.1, 0.1)
    noise_p: float = 0.0
    noise_std_range: Range = (0.0, 0.1)

    def __post_init__(self):
        # Sequences are stored as tuples of floats so that the config stays hashable
        # (usable as a static jit argument) whatever the caller passed.
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        if not _is_sequence(self.mirror_p, 3):
            raise ValueError(
                f"AugmentConfig.mirror_p must be 3 probabilities (x, y, z), got {self.mirror_p!r}"
            )
        set_(
            "mirror_p",
            tuple(_probability(f"mirror_p[{i}]", p) for i, p in enumerate(self.mirror_p)),
        )
        if not _is_sequence(self.rotation_degrees, 3):
            raise ValueError(
                "AugmentConfig.rotation_degrees must be 3 (low, high) ranges (x, y, z), "
                f"got {self.rotation_degrees!r}"
            )
        set_(
            "rotation_degrees",
            tuple(_range(f"rotation_degrees[{i}]", r) for i, r in enumerate(self.rotation_degrees)),
        )
        for name in (
            "rotation_p",
            "scale_p",
            "elastic_p",
            "gamma_p",
            "intensity_scale_p",
            "intensity_shift_p",
            "noise_p",
        ):
            set_(name, _probability(name, getattr(self, name)))
        set_("scale_range", _range("scale_range", self.scale_range, low=0.0, strict=True))
        set_("elastic_amplitude", _range("elastic_amplitude", self.elastic_amplitude, low=0.0))
        set_("gamma_range", _range("gamma_range", self.gamma_range, low=0.0, strict=True))
        set_("intensity_scale_range", _range("intensity_scale_range", self.intensity_scale_range))
        set_("intensity_shift_range", _range("intensity_shift_range", self.intensity_shift_range))
        set_("noise_std_range", _range("noise_std_range", self.noise_std_range, low=0.0))
        spacing = self.elastic_spacing
        if isinstance(spacing, bool) or not isinstance(spacing, int) or spacing < 1:
            raise ValueError(
                f"AugmentConfig.elastic_spacing must be an int >= 1 (voxels), got {spacing!r}"
            )

    @property
    def resamples(self) -> bool:
        """Whether a transform other than mirroring can be drawn (so a grid is needed)."""
        return self.rotation_p > 0 or self.scale_p > 0 or self.elastic_p > 0


def _is_sequence(value, length: int) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str) and len(value) == length


def _real(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _probability(name: str, value) -> float:
    if not _real(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"AugmentConfig.{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def _range(name: str, value, *, low: float | None = None, strict: bool = False) -> Range:
    """`value` as a `(low, high)` float tuple, checked against an optional lower bound."""
    if not _is_sequence(value, 2) or not all(_real(v) for v in value) or value[0] > value[1]:
        raise ValueError(
            f"AugmentConfig.{name} must be a finite (low, high) range with low <= high, "
            f"got {value!r}"
        )
    if low is not None and (value[0] <= low if strict else value[0] < low):
        bound = ">" if strict else ">="
        raise ValueError(f"AugmentConfig.{name} must have low {bound} {low}, got {value!r}")
    return float(value[0]), float(value[1])


AUGMENTATIONS: Mapping[str, AugmentConfig | None] = MappingProxyType(
    {
        "none": None,
        # MONAI's BraTS tutorial: flips and small per-channel intensity jitter, always on.
        "light": AugmentConfig(
            mirror_p=(0.5, 0.5, 0.5),
            intensity_scale_p=1.0,
            intensity_scale_range=(0.9, 1.1),
            intensity_shift_p=1.0,
            intensity_shift_range=(-0.1, 0.1),
        ),
        # nnU-Net's probabilities; elastic deformation rarer, as nnU-Net v2 drops it.
        "default": AugmentConfig(
            mirror_p=(0.5, 0.5, 0.5),
            rotation_p=0.2,
            scale_p=0.2,
            elastic_p=0.1,
            gamma_p=0.3,
            intensity_scale_p=0.15,
            intensity_shift_p=0.15,
            noise_p=0.1,
        ),
    }
)


def get_augmentation(name: str) -> AugmentConfig | None:
    """The preset `name` of `AUGMENTATIONS` (None for "none": no augmentation).

    Raises:
      ValueError: `name` is not a preset; the message lists the valid names.
    """
    if name not in AUGMENTATIONS:
        raise ValueError(
            f"unknown augmentation {name!r}; choose one of {', '.join(sorted(AUGMENTATIONS))}"
        )
    return AUGMENTATIONS[name]


def augment_batch(
    key: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    config: AugmentConfig | None,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, ...]:
    """Augments a batch of patches, each item with its own draw (module docstring).

    Args:
      key: a typed JAX key, scalar.
      images: `[B, *S, C]` floating intensities, `S` 2 or 3 spatial dims.
      labels: `[B, *S]` integer classes.
      config: the augmentations (static); None returns the inputs unchanged.
      weights: optional `[B, *S]` float per-voxel loss weights, moved like the labels.

    Returns:
      `(images, labels)`, or `(images, labels, weights)` when weights are given, with the
      input shapes and dtypes.

    Raises:
      ValueError: on ranks, shapes or dtypes other than the above.
    """
    _check_batch(images, labels, weights)
    if config is None:
        return (images, labels) if weights is None else (images, labels, weights)
    has_weights = weights is not None
    # A dummy weight array keeps one vmapped code path; XLA drops it when unused.
    weights = jnp.zeros(labels.shape, images.dtype) if weights is None else weights

    def one(item_key, image, label, weight):
        return _augment_item(item_key, image, label, weight, config)

    images, labels, weights = jax.vmap(one)(
        jax.random.split(key, images.shape[0]), images, labels, weights
    )
    return (images, labels, weights) if has_weights else (images, labels)


def _check_batch(images, labels, weights) -> None:
    if images.ndim not in (4, 5):
        raise ValueError(f"images must be [B, *S, C] with 2 or 3 spatial dims, got {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images must be floating point, got {images.dtype}")
    if labels.shape != images.shape[:-1]:
        raise ValueError(f"labels must be [B, *S] = {images.shape[:-1]}, got {labels.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integer classes, got {labels.dtype}")
    if weights is not None and weights.shape != labels.shape:
        raise ValueError(f"weights must be [B, *S] = {labels.shape}, got {weights.shape}")


class _Draws(NamedTuple):
    """One item's random parameters; an undrawn transform holds its identity value."""

    signs: jax.Array  # [d] float32, -1 on the spatial axes to mirror, else 1
    angles: jax.Array  # [1] (2D, in-plane) or [3] (3D, about x, y, z) float32 radians, or 0
    zoom: jax.Array  # [] float32 zoom factor, or 1
    elastic: jax.Array  # [] float32 control-point displacement std in voxels, or 0
    noise_std: jax.Array  # [] float32, or 0
    scale: jax.Array  # [C] float32 intensity factors, or 1
    shift: jax.Array  # [C] float32 intensity offsets, or 0
    gamma: jax.Array  # [C] float32 exponents
    gamma_drawn: jax.Array  # [] float32 1 or 0 (gamma 1 is not an exact identity in floats)


_SCALAR_DRAWS = ("zoom", "elastic", "noise_std", "gamma_drawn")


def _draw(key, ndim: int, num_channels: int, config: AugmentConfig) -> _Draws:
    """Every random scalar of one item, from a single RNG call, computed once.

    Each `jax.random` call inlines a threefry hash into the compiled program, so one call
    per value would multiply compile time (measured: seconds per call on a 2-core CPU).
    """
    rotation_ranges = config.rotation_degrees[2:] if ndim == 2 else config.rotation_degrees
    sizes = [ndim, 1 + len(rotation_ranges), 2, 2, 2] + [1 + num_channels] * 3
    uniforms = jax.random.uniform(key, (sum(sizes),))
    mirror, rotation, zoom, elastic, noise, scale, shift, gamma = jnp.split(
        uniforms, np.cumsum(sizes)[:-1].tolist()
    )
    per_channel = lambda bounds: [bounds] * num_channels  # noqa: E731
    draws = _Draws(
        signs=jnp.where(mirror < np.asarray(config.mirror_p[:ndim], np.float32), -1.0, 1.0),
        angles=jnp.deg2rad(_maybe(rotation, config.rotation_p, rotation_ranges, 0.0)),
        zoom=_maybe(zoom, config.scale_p, [config.scale_range], 1.0),
        elastic=_maybe(elastic, config.elastic_p, [config.elastic_amplitude], 0.0),
        noise_std=_maybe(noise, config.noise_p, [config.noise_std_range], 0.0),
        scale=_maybe(
            scale, config.intensity_scale_p, per_channel(config.intensity_scale_range), 1.0
        ),
        shift=_maybe(
            shift, config.intensity_shift_p, per_channel(config.intensity_shift_range), 0.0
        ),
        gamma=_maybe(gamma, config.gamma_p, per_channel(config.gamma_range), 1.0),
        gamma_drawn=jnp.where(gamma[:1] < config.gamma_p, 1.0, 0.0),
    )
    packed = _materialise(jnp.concatenate(draws))
    parts = jnp.split(packed, np.cumsum([x.shape[0] for x in draws])[:-1].tolist())
    return _Draws(
        *(
            part[0] if name in _SCALAR_DRAWS else part
            for name, part in zip(_Draws._fields, parts, strict=True)
        )
    )


def _materialise(x: jax.Array) -> jax.Array:
    """`x` `[n]` unchanged, but computed once rather than inside every loop that reads it.

    XLA's CPU fusion copies cheap producers into each consumer, so the few per-item
    values would be recomputed for every voxel of every per-voxel loop, which measured 2-4x
    slower at `4 × 32³ × 4`; it also drops `lax.optimization_barrier` before fusing. A dot
    is never fused into its consumers, and a product with the identity at HIGHEST
    precision is exact.
    """
    return jnp.matmul(x, jnp.eye(x.shape[0], dtype=x.dtype), precision=_HIGHEST)


def _maybe(uniforms: jax.Array, p: float, ranges: Sequence[Range], identity: float) -> jax.Array:
    """Values uniform in `ranges` from `uniforms[1:]` if `uniforms[0] < p`, else `identity`."""
    low, high = np.asarray(ranges, np.float32).T
    return jnp.where(uniforms[0] < p, low + (high - low) * uniforms[1:], identity)


def _augment_item(key, image, label, weight, config: AugmentConfig):
    """One item: image `[*S, C]`, label and weight `[*S]`."""
    shape = image.shape[:-1]
    draw_key, elastic_key, noise_key = jax.random.split(key, 3)
    draws = _draw(draw_key, len(shape), image.shape[-1], config)
    # Gamma's range is the source patch's, read before resampling: a reduction over the
    # resampled image would make XLA recompute the whole interpolation in each consumer.
    bounds = _channel_range(image) if config.gamma_p > 0 else None
    if config.resamples:
        coords = _sampling_grid(draws, elastic_key, shape, config)
        image = _sample_linear(image, coords)
        label = _sample_nearest(label, coords)
        weight = _sample_nearest(weight, coords)
    elif any(config.mirror_p[: len(shape)]):
        image, label, weight = (_flip(x, draws.signs) for x in (image, label, weight))
    return _intensity(draws, noise_key, image, bounds, config), label, weight


# ---------------------------------------------------------------------------- spatial


def _flip(x, signs):
    """`x` flipped along each spatial axis `a` where `signs[a] < 0` (a pure flip, exact)."""
    for axis in range(signs.shape[0]):
        x = jnp.where(signs[axis] < 0, jnp.flip(x, axis), x)
    return x


def _rotation(angles: jax.Array) -> jax.Array:
    """[d, d] rotation by `angles` ([1] in-plane or [3] about x, y, z); exact at angle 0."""
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if angles.shape[0] == 1:
        return _plane_rotation(2, 0, 1, cos[0], sin[0])
    about_x = _plane_rotation(3, 1, 2, cos[0], sin[0])  # y towards z
    about_y = _plane_rotation(3, 2, 0, cos[1], sin[1])  # z towards x
    about_z = _plane_rotation(3, 0, 1, cos[2], sin[2])  # x towards y
    # HIGHEST: GPU matmuls otherwise round to TF32 and the rotation stops being orthogonal.
    return jnp.matmul(about_z, jnp.matmul(about_y, about_x, precision=_HIGHEST), precision=_HIGHEST)


def _plane_rotation(ndim: int, i: int, j: int, cos, sin) -> jax.Array:
    """Rotation in the plane of axes (i, j), turning axis i towards axis j."""
    rotation = jnp.eye(ndim, dtype=jnp.float32)
    return rotation.at[i, i].set(cos).at[j, j].set(cos).at[j, i].set(sin).at[i, j].set(-sin)


def _bspline_matrix(n: int, spacing: int) -> np.ndarray:
    """[n, g] cubic B-spline weights of control points every `spacing` voxels over [0, n-1].

    Control point k sits at voxel (k - 1)·spacing; one extra point beyond each end gives
    every voxel the full 4-point support. Each row is scaled to unit norm, so that a field
    of independent N(0, 1) control points has variance exactly 1 at every voxel (the
    B-spline alone would give 0.5 to 0.65 per axis, varying between control points).
    """
    count = -(-(n - 1) // spacing) + 3
    t = np.abs(np.arange(n)[:, None] / spacing - (np.arange(count)[None, :] - 1))
    weights = np.where(t < 1, 2 / 3 - t**2 + t**3 / 2, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))
    weights /= np.linalg.norm(weights, axis=1, keepdims=True)
    return weights.astype(np.float32)


def _displacement(key, amplitude: jax.Array, shape: tuple[int, ...], spacing: int) -> jax.Array:
    """[d, *S] smooth displacement in voxels, std `amplitude` at every voxel and axis.

    A cubic B-spline of Gaussian control points (as in B-spline free-form deformations).
    The weight matrices are static NumPy constants, so upsampling is d small contractions
    (cheaper to compile and run than `jax.image.resize`), and 0 amplitude gives exactly 0.
    """
    matrices = [_bspline_matrix(n, spacing) for n in shape]
    field = jax.random.normal(key, (len(shape), *(m.shape[1] for m in matrices)), jnp.float32)
    for axis, matrix in enumerate(matrices):
        field = jnp.tensordot(matrix, field, axes=([1], [axis + 1]), precision=_HIGHEST)
        field = jnp.moveaxis(field, 0, axis + 1)
    return amplitude * field


def _sampling_grid(draws: _Draws, elastic_key, shape: tuple[int, ...], config: AugmentConfig):
    """[d, *S] input coordinates `p(x) = c + Rᵀ F (x − c) / s + e(x)` of each output voxel."""
    ndim = len(shape)
    # Backward map of the forward content transform x ↦ c + F R s (x − c).
    matrix = _rotation(draws.angles).T * draws.signs[None, :] / draws.zoom
    centre = [(n - 1) / 2 for n in shape]
    offsets = [
        jnp.arange(n, dtype=jnp.float32).reshape([-1 if a == axis else 1 for a in range(ndim)])
        - centre[axis]
        for axis, n in enumerate(shape)
    ]
    # Written out rather than as a matmul: exact on every backend (no TF32), so an
    # identity or pure mirror lands exactly on integer coordinates. Each axis's offsets
    # broadcast along the others, so each sum is [*S].
    coords = jnp.stack(
        [centre[i] + sum(matrix[i, j] * offsets[j] for j in range(ndim)) for i in range(ndim)]
    )
    if config.elastic_p > 0:
        coords = coords + _displacement(elastic_key, draws.elastic, shape, config.elastic_spacing)
    return coords


class _Corner(NamedTuple):
    index: jax.Array  # [*S] int32 flat index into the patch, clipped inside
    weight: jax.Array  # [*S] float32 interpolation weight, 0 where the corner is outside


def _corners(coords: jax.Array, shape: tuple[int, ...], order: int) -> list[_Corner]:
    """The 2^d (order 1) or 1 (order 0) interpolation corners of each output voxel."""
    per_axis = []
    for axis, n in enumerate(shape):
        coord = coords[axis]
        if order == 0:
            # Half away from zero (`lax.round`'s default), as `map_coordinates(order=0)`;
            # `jnp.round` would round half to even.
            nodes = [(jax.lax.round(coord).astype(jnp.int32), None)]
        else:
            lower = jnp.floor(coord)
            upper_weight = coord - lower
            lower = lower.astype(jnp.int32)
            nodes = [(lower, 1.0 - upper_weight), (lower + 1, upper_weight)]
        per_axis.append([(index, (index >= 0) & (index < n), w) for index, w in nodes])
    strides = [math.prod(shape[axis + 1 :]) for axis in range(len(shape))]
    corners = []
    for nodes in itertools.product(*per_axis):
        flat = sum(
            jnp.clip(index, 0, n - 1) * stride
            for (index, _, _), n, stride in zip(nodes, shape, strides, strict=True)
        )
        inside = functools.reduce(operator.and_, [valid for _, valid, _ in nodes])
        weight = math.prod(w for _, _, w in nodes) if order else jnp.ones(inside.shape)
        corners.append(_Corner(flat, jnp.where(inside, weight, 0.0)))
    return corners


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
    """`x` `[*S, ...]` read at flat spatial indices `index` `[*S]` (all trailing values)."""
    flat = x.reshape(-1, *x.shape[index.ndim :])
    return flat.at[index].get(mode="promise_in_bounds")


def _sample_linear(image: jax.Array, coords: jax.Array) -> jax.Array:
    """[*S, C] image at `coords` by (multi)linear interpolation, 0 outside."""
    corners = _corners(coords, image.shape[:-1], order=1)
    # Each gather reads all C channels: the corners and weights are shared across them.
    terms = [
        corner.weight[..., None] * _gather(image, corner.index).astype(jnp.float32)
        for corner in corners
    ]
    # Summed from the first term (not from zeros), so weight-1 corners return values exactly.
    return sum(terms[1:], terms[0]).astype(image.dtype)


def _sample_nearest(x: jax.Array, coords: jax.Array) -> jax.Array:
    """[*S] values (labels or weights) of the nearest voxel at `coords`, 0 outside."""
    (corner,) = _corners(coords, x.shape, order=0)
    return jnp.where(corner.weight > 0, _gather(x, corner.index), jnp.zeros((), x.dtype))


# ---------------------------------------------------------------------------- intensity


def _intensity(draws: _Draws, noise_key, image: jax.Array, bounds, config: AugmentConfig):
    """Gamma, scale, shift and noise on `[*S, C]`; transforms never drawn cost nothing.

    Gamma comes first (nnU-Net puts it last) so that `bounds`, the source patch's range,
    still bounds its input: the whole chain is then one elementwise pass.
    """
    dtype = image.dtype
    # Per-channel values broadcast as [1, ..., 1, C] (ranks never promote implicitly).
    channels = (1,) * (image.ndim - 1) + image.shape[-1:]
    if config.gamma_p > 0:
        gamma = draws.gamma.astype(dtype).reshape(channels)
        # `where`: gamma 1 is not an exact identity in floating point.
        image = jnp.where(draws.gamma_drawn > 0, _gamma(image, gamma, *bounds), image)
    if config.intensity_scale_p > 0:
        image = image * draws.scale.astype(dtype).reshape(channels)
    if config.intensity_shift_p > 0:
        image = image + draws.shift.astype(dtype).reshape(channels)
    if config.noise_p > 0:
        noise = jax.random.normal(noise_key, image.shape, dtype)
        # `where`, not `+ 0 · noise`, so that an undrawn transform leaves the bits as they are.
        image = jnp.where(draws.noise_std > 0, image + draws.noise_std.astype(dtype) * noise, image)
    return image


def _channel_range(image: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel `[1, ..., 1, C]` min and max of `image` and 0 (the fill value outside)."""
    spatial = tuple(range(image.ndim - 1))
    low = jnp.minimum(jnp.min(image, axis=spatial, keepdims=True), 0.0)
    high = jnp.maximum(jnp.max(image, axis=spatial, keepdims=True), 0.0)
    return low, high


def _gamma(image: jax.Array, gamma: jax.Array, low: jax.Array, high: jax.Array) -> jax.Array:
    """`((x − low) / (high − low))^γ · (high − low) + low`, per channel."""
    span = high - low
    # An all-zero channel has no range to normalise by; it is left as it is.
    safe = jnp.where(span > 0, span, 1.0)
    unit = jnp.clip((image - low) / safe, 0.0, 1.0)
    # exp(γ·log u), not u**γ: XLA's CPU pow is ~5x slower; log 0 = -inf gives 0^γ = 0.
    return jnp.where(span > 0, jnp.exp(gamma * jnp.log(unit)) * span + low, image)
