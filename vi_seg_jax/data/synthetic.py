"""Synthetic BraTS-like cases built from the MNI152 template: the project's default dataset.

Each case is a real brain, not a phantom: the MNI152 2009c (symmetric, 1 mm) template and its
grey- and white-matter probability maps, which nilearn ships inside its package, are warped by
a per-case random rotation, anisotropic scaling, translation and smooth displacement field and
resampled straight onto the output grid. CSF is the template's brain mask minus grey and white
matter. On that anatomy the generator draws either

* `domain="tumour"`: a glioma with the three BraTS sub-regions (necrotic core, enhancing rim,
  surrounding edema), irregular borders from smooth noise modulating an ellipsoidal radius,
  edema that spreads preferentially along white matter, and an optional mass effect that pushes
  the surrounding tissue away; cases with index % 4 == 3 are low grade (`"LGG"`: little or no
  necrosis, patchy or absent enhancement), the others high grade (`"HGG"`); or
* `domain="lesions"`: 3-10 small multiple-sclerosis-like white-matter lesions, mostly
  periventricular, labelled edema (canonical 2), a few with a T1-dark core labelled 1 and never
  enhancing. It serves as the deep-weight-prior source domain and as an out-of-distribution set.

Four modalities are synthesised from tissue fractions with per-tissue mean intensities that
follow real MRI contrast (T1: WM > GM > CSF; T1ce: T1 plus a bright enhancing rim; T2: CSF
brightest, GM > WM; FLAIR: CSF dark, GM > WM, edema and lesions bright), then degraded like a
scanner would: partial-volume blur, a smooth multiplicative bias field, a random gain per case
and modality, and Rician noise (magnitude of complex Gaussian noise). Voxels outside the brain
are 0, as in the skull-stripped BraTS releases.

Labels are genuinely ambiguous near the edema margin: the edema is a soft probability map
(a logistic ramp 2-5 mm wide that also drives the image intensity), and the label is that map
thresholded at 0.5 after a smooth "rater" shift of its border (1-3 mm standard deviation,
varying over the margin; half as much for the tumour core, capped for small lesions). The soft
map before the rater shift is returned as `SyntheticCase.tumour_probability`.

Geometry: the output grid always covers the BraTS field of view, 240 x 240 x 155 mm, centred
on the brain; voxel spacing is field of view / shape, and the affine is diagonal and RAS
(+x right, +y anterior, +z superior), with world coordinates close to MNI space. The default
grid (64, 64, 48), i.e. 3.75 x 3.75 x 3.23 mm voxels, is small enough for CPU training of a 3D
U-Net with three stride-2 stages (64 and 48 are multiples of 2^3 and 2^4) yet resolves the
tumour sub-regions; `shape=(240, 240, 155)` gives the BraTS 1 mm grid.

Determinism: case `index` of a dataset is drawn from `np.random.SeedSequence((seed, index,
domain))`, so the same configuration gives byte-identical arrays (same numpy/scipy build; the
thread count does not matter) and cases can be generated in any order. All smooth random fields
live on lattices fixed in world millimetres and tumour or lesion sites are chosen on a fixed
4 mm grid, so a case's anatomy and tumour are (up to interpolation) the same at every output
`shape`. What depends on the grid: the voxel-wise noise, and on coarse grids the enhancing rim
(at least 1.1 voxels thick) and the lesion radii (at least 0.9 voxels), so they stay visible.

Cost (one CPU core): about 0.2-0.4 s to generate and 0.5 s to generate and write a default case,
plus about 1 s to load the template once per process and resolution; 10-25 s per case at
240 x 240 x 155 (about 2 GB of memory).

Only numpy and scipy are used; the template is read through `vi_seg_jax.io.nifti`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage

from vi_seg_jax.data.conventions import (
    BACKGROUND,
    CORE,
    EDEMA,
    ENHANCING,
    MODALITIES,
    get_layout,
)
from vi_seg_jax.errors import DataError
from vi_seg_jax.io.nifti import read_nifti, write_nifti

__all__ = [
    "BRATS_FOV_MM",
    "DEFAULT_SHAPE",
    "DOMAINS",
    "GENERATOR_VERSION",
    "SyntheticCase",
    "SyntheticConfig",
    "case_files",
    "case_grade",
    "case_id",
    "generate_case",
    "write_case",
    "write_dataset",
]

# Bump whenever the same configuration starts producing different arrays (it names caches).
GENERATOR_VERSION = 1
DEFAULT_SHAPE = (64, 64, 48)
BRATS_FOV_MM = (240.0, 240.0, 155.0)
DOMAINS = ("tumour", "lesions")
MIN_SIZE = 16  # smallest grid size per axis

# World point (mm, MNI-like RAS) at the centre of the output grid: the centre of the template's
# brain (x -72..72, y -107..73, z -72..82 mm), shifted up a little to spare the vertex.
_GRID_CENTRE_MM = np.array([0.0, -17.0, 8.0])
_COARSE_SPACING_MM = 4.0  # shape-independent grid on which lesion and tumour sites are chosen

_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
_BRAIN_THRESHOLD = 10.0  # template T1 (0-255) above this is brain (it is skull-stripped)

# Mean intensity of each tissue per modality, relative to white matter on T1. Ordering follows
# clinical MRI: T1 WM > GM > CSF; T1ce = T1 with a bright enhancing rim; T2 CSF > GM > WM and
# bright tumour; FLAIR GM > WM > CSF with bright edema and lesions. Grey matter is set a little
# brighter than its textbook ratio because the template's cortex shares most voxels with sulcal
# CSF (dark on T1 and FLAIR), which pulls measured GM means down.
_TISSUES = ("csf", "gm", "wm", "edema", "necrosis", "non_enhancing", "enhancing", "lesion",
            "lesion_core")  # fmt: skip
_MEANS = {
    #         csf   gm    wm    edema nec   non-e enh   lesion l-core
    "t1": (0.30, 0.68, 1.00, 0.72, 0.35, 0.60, 0.66, 0.74, 0.45),
    "t1ce": (0.30, 0.70, 1.00, 0.74, 0.32, 0.62, 1.60, 0.76, 0.46),
    "t2": (1.60, 0.80, 0.55, 1.15, 1.50, 1.10, 0.90, 1.12, 1.35),
    "flair": (0.20, 0.92, 0.62, 1.40, 0.75, 1.15, 1.00, 1.35, 0.95),
}


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """What to generate.

    Attributes:
      shape: output grid [X, Y, Z]; the field of view stays `fov_mm`, so the spacing is
        `fov_mm / shape` (default 3.75 x 3.75 x 3.23 mm).
      domain: `"tumour"` (gliomas, BraTS-like) or `"lesions"` (small MS-like lesions).
      seed: dataset seed; case `i` is drawn from `(seed, i, domain)`.
      mass_effect: tumours push the surrounding tissue away (tumour domain only).
      fov_mm: field of view in mm (BraTS: 240 x 240 x 155).
    """

    shape: tuple[int, int, int] = DEFAULT_SHAPE
    domain: str = "tumour"
    seed: int = 0
    mass_effect: bool = True
    fov_mm: tuple[float, float, float] = BRATS_FOV_MM

    def __post_init__(self):
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 3 or min(shape) < MIN_SIZE:
            raise ValueError(f"shape must be 3 sizes, each >= {MIN_SIZE}; got {self.shape}")
        if int(self.seed) < 0:
            raise ValueError(f"seed must be >= 0; got {self.seed}")
        if self.domain not in DOMAINS:
            raise ValueError(f"domain must be one of {list(DOMAINS)}; got {self.domain!r}")
        if len(self.fov_mm) != 3 or min(self.fov_mm) <= 0:
            raise ValueError(f"fov_mm must be 3 positive lengths; got {self.fov_mm}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "fov_mm", tuple(float(f) for f in self.fov_mm))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm."""
        return tuple(f / s for f, s in zip(self.fov_mm, self.shape, strict=True))

    @property
    def affine(self) -> np.ndarray:
        """[4, 4] voxel -> world (mm, RAS) matrix shared by every file of every case."""
        spacing = np.asarray(self.spacing)
        affine = np.eye(4)
        affine[:3, :3] = np.diag(spacing)
        affine[:3, 3] = _GRID_CENTRE_MM - spacing * (np.asarray(self.shape) - 1) / 2
        return affine


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticCase:
    """One generated case, in canonical classes.

    Attributes:
      index: position in the dataset.
      label: [X, Y, Z] uint8 canonical classes (0 bg, 1 necrotic/non-enhancing core, 2 edema,
        3 enhancing).
      images: modality (`t1`, `t1ce`, `t2`, `flair`) -> [X, Y, Z] float32, 0 outside the brain.
      affine: [4, 4] float64 voxel -> world mm.
      brain_mask: [X, Y, Z] bool, the skull-stripping mask.
      tumour_probability: [X, Y, Z] float32 in [0, 1], the soft whole-tumour (or lesion)
        fraction of each voxel before the rater shift: a reference for aleatoric uncertainty.
      tissue_fractions: `csf`, `gm`, `wm` -> [X, Y, Z] float32, the share of each voxel
        taken by normal (non-tumour) tissue of that kind.
      grade: `"HGG"` or `"LGG"` for tumours, None for lesions.
    """

    index: int
    label: np.ndarray
    images: dict[str, np.ndarray]
    affine: np.ndarray
    brain_mask: np.ndarray
    tumour_probability: np.ndarray
    tissue_fractions: dict[str, np.ndarray]
    grade: str | None


# --------------------------------------------------------------------------------------------
# Template


@dataclasses.dataclass(frozen=True)
class _Template:
    brain: np.ndarray  # [I, J, K] float32 in [0, 1], soft brain mask
    gm: np.ndarray  # [I, J, K] float32 in [0, 1]
    wm: np.ndarray  # [I, J, K] float32 in [0, 1]
    world_to_voxel: np.ndarray  # [4, 4]


def _template_folder() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("nilearn", "not installed; it ships the MNI152 template used here")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


def _block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return volume
    crop = tuple(slice(0, (s // factor) * factor) for s in volume.shape)
    v = volume[crop]
    i, j, k = (s // factor for s in v.shape)
    return v.reshape(i, factor, j, factor, k, factor).mean(axis=(1, 3, 5))


@functools.lru_cache(maxsize=4)
def _load_template(factor: int) -> _Template:
    """The MNI152 brain, GM and WM maps, block-averaged by `factor` (anti-aliasing)."""
    folder = _template_folder()
    volumes = {name: read_nifti(folder / file) for name, file in _TEMPLATE_FILES.items()}
    brain = (volumes["t1"].data > _BRAIN_THRESHOLD).astype(np.float32)
    gm = np.clip(volumes["gm"].data / 255.0, 0, 1) * brain
    wm = np.clip(volumes["wm"].data / 255.0, 0, 1) * brain
    # Voxel centre of output block b is source index b * factor + (factor - 1) / 2.
    scale = np.eye(4)
    scale[:3, :3] *= factor
    scale[:3, 3] = (factor - 1) / 2
    affine = volumes["t1"].affine @ scale
    return _Template(
        brain=_block_mean(brain, factor).astype(np.float32),
        gm=_block_mean(gm, factor).astype(np.float32),
        wm=_block_mean(wm, factor).astype(np.float32),
        world_to_voxel=np.linalg.inv(affine),
    )


def _template_factor(spacing: tuple[float, ...]) -> int:
    return max(1, int(min(spacing) / 1.5))


# --------------------------------------------------------------------------------------------
# Smooth random fields: cubic B-splines on lattices fixed in world mm, evaluated separably on
# axis-aligned grids (cheap even at 240 x 240 x 155).


@dataclasses.dataclass(frozen=True)
class _Grid:
    axes: tuple[np.ndarray, np.ndarray, np.ndarray]  # world mm of voxel centres per axis
    spacing: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(len(a) for a in self.axes)

    def points(self) -> np.ndarray:
        """[3, X, Y, Z] float32 world coordinates."""
        return np.stack(np.meshgrid(*self.axes, indexing="ij")).astype(np.float32)


def _output_grid(config: SyntheticConfig) -> _Grid:
    affine = config.affine
    axes = tuple(
        (affine[d, 3] + affine[d, d] * np.arange(n)).astype(np.float32)
        for d, n in enumerate(config.shape)
    )
    return _Grid(axes, config.spacing)


def _coarse_grid(config: SyntheticConfig) -> _Grid:
    shape = tuple(max(2, round(f / _COARSE_SPACING_MM)) for f in config.fov_mm)
    coarse = dataclasses.replace(config, shape=tuple(max(s, MIN_SIZE) for s in shape))
    return _output_grid(coarse)


def _fov_box(config: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    half = np.asarray(config.fov_mm) / 2
    return _GRID_CENTRE_MM - half, _GRID_CENTRE_MM + half


def _bspline_matrix(coords: np.ndarray, origin: float, spacing: float, n: int) -> np.ndarray:
    """[len(coords), n] cubic B-spline weights of lattice knots at `origin + k * spacing`."""
    u = (coords.astype(np.float64) - origin) / spacing
    i = np.floor(u).astype(np.int64)
    t = u - i
    weights = (
        np.stack(
            [(1 - t) ** 3, 3 * t**3 - 6 * t**2 + 4, -3 * t**3 + 3 * t**2 + 3 * t + 1, t**3], axis=1
        )
        / 6.0
    )
    matrix = np.zeros((len(coords), n))
    rows = np.arange(len(coords))
    for offset in range(4):
        matrix[rows, np.clip(i - 1 + offset, 0, n - 1)] += weights[:, offset]
    return matrix.astype(np.float32)


class _FieldSampler:
    """Draws unit-variance smooth Gaussian fields with a given feature size (lattice spacing)."""

    def __init__(self, config: SyntheticConfig, rng: np.random.Generator):
        self._box = _fov_box(config)
        self._rng = rng

    def draw(self, spacing_mm: float) -> Callable[[_Grid], np.ndarray]:
        lo, hi = self._box
        origin = lo - 2 * spacing_mm
        n = np.ceil((hi - lo) / spacing_mm).astype(int) + 5
        lattice = self._rng.standard_normal(tuple(n)).astype(np.float32)

        def on_grid(grid: _Grid) -> np.ndarray:
            mats = [
                _bspline_matrix(a, origin[d], spacing_mm, n[d]) for d, a in enumerate(grid.axes)
            ]
            # Separable contraction lattice[a, b, c] -> field[i, j, k], all matrix products.
            a, b, c = lattice.shape
            field = (mats[0] @ lattice.reshape(a, b * c)).reshape(-1, b, c)
            field = np.matmul(mats[1][None], field)
            field = field @ mats[2].T
            norms = [np.sqrt((m**2).sum(axis=1)) for m in mats]
            field /= norms[0][:, None, None] * norms[1][None, :, None] * norms[2][None, None, :]
            return field

        return on_grid


# --------------------------------------------------------------------------------------------
# Anatomy: random warp of the template onto the output grid


@dataclasses.dataclass(frozen=True)
class _Warp:
    """Output world point p -> template world point: C + M (p + d(p) - mass(p) - C - t)."""

    matrix: np.ndarray  # [3, 3] inverse of rotation @ scaling
    translation: np.ndarray  # [3]
    displacement: tuple[Callable[[_Grid], np.ndarray], ...]  # 3 fields, mm
    displacement_mm: float


def _rotation(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _draw_warp(rng: np.random.Generator, fields: _FieldSampler) -> _Warp:
    # BraTS brains are rigidly registered to an atlas: small rotations (mostly about z). The
    # MNI152 brain is larger than the average adult brain, hence the global shrink.
    rotation = _rotation(np.deg2rad(rng.uniform(-1, 1, size=3) * np.array([5.0, 5.0, 8.0])))
    scaling = rng.uniform(0.84, 0.95) * rng.uniform(0.96, 1.04, size=3)
    matrix = np.linalg.inv(rotation @ np.diag(scaling))
    translation = rng.uniform(-1, 1, size=3) * np.array([6.0, 6.0, 3.0])
    displacement = tuple(fields.draw(40.0) for _ in range(3))
    return _Warp(matrix, translation, displacement, float(rng.uniform(2.0, 4.5)))


def _sample_anatomy(
    warp: _Warp, grid: _Grid, template: _Template, mass: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Brain, CSF, GM and WM fractions on `grid` (each [X, Y, Z] float32, c + g + w = brain)."""
    points = grid.points()
    for d in range(3):
        points[d] += warp.displacement_mm * warp.displacement[d](grid)
    if mass is not None:
        points -= mass
    # One affine map from the warped output point to template voxel indices.
    linear = template.world_to_voxel[:3, :3] @ warp.matrix
    offset = (
        template.world_to_voxel[:3, :3]
        @ (_GRID_CENTRE_MM - warp.matrix @ (_GRID_CENTRE_MM + warp.translation))
        + template.world_to_voxel[:3, 3]
    )
    voxel = linear.astype(np.float32) @ points.reshape(3, -1)
    voxel += offset.astype(np.float32)[:, None]
    del points

    def sample(volume):
        out = ndimage.map_coordinates(volume, voxel, order=1, mode="constant", cval=0.0)
        return np.clip(out, 0, 1).reshape(grid.shape).astype(np.float32)

    brain, gm, wm = sample(template.brain), sample(template.gm), sample(template.wm)
    csf = np.clip(brain - gm - wm, 0, None)
    scale = brain / np.maximum(gm + wm + csf, 1e-6)
    return {"brain": brain, "csf": csf * scale, "gm": gm * scale, "wm": wm * scale}


def _inside_distance(mask: np.ndarray, spacing: float) -> np.ndarray:
    return ndimage.distance_transform_edt(mask, sampling=spacing)


def _pick(rng: np.random.Generator, grid: _Grid, candidates: np.ndarray) -> np.ndarray:
    """World mm of a random candidate voxel, jittered within the voxel."""
    index = np.argwhere(candidates)[rng.integers(candidates.sum())]
    centre = np.array([grid.axes[d][index[d]] for d in range(3)], dtype=np.float64)
    return centre + rng.uniform(-0.5, 0.5, size=3) * _COARSE_SPACING_MM


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)


def _ellipsoid_radius(
    grid: _Grid, centre: np.ndarray, rotation: np.ndarray, axes: np.ndarray
) -> np.ndarray:
    """[X, Y, Z] ellipsoidal distance (mm) from `centre` with semi-axes scaled by `axes`."""
    offsets = grid.points() - centre.astype(np.float32)[:, None, None, None]
    local = np.einsum("dk,dxyz->kxyz", (rotation / axes[None, :]).astype(np.float32), offsets)
    return np.sqrt((local**2).sum(axis=0))


# --------------------------------------------------------------------------------------------
# Tumour domain


@dataclasses.dataclass(frozen=True)
class _Tumour:
    centre: np.ndarray  # [3] world mm
    rotation: np.ndarray  # [3, 3]
    axes: np.ndarray  # [3] relative semi-axes
    core_mm: float  # tumour core radius
    necrosis_mm: float
    whole_mm: float  # edema outer radius (in white matter)
    edema_width_mm: float
    irregularity: tuple[float, float, float]  # core, necrosis, edema noise amplitudes
    enhancing_threshold: float  # rim voxels enhance where a smooth field exceeds this
    mass: float  # mass-effect strength in [0, 0.45]


def case_grade(index: int) -> str:
    """`"LGG"` for every fourth case (index % 4 == 3, about BraTS 2018's share), else `"HGG"`."""
    return "LGG" if index % 4 == 3 else "HGG"


def _draw_tumour(
    rng: np.random.Generator,
    grade: str,
    coarse: _Grid,
    anatomy: dict[str, np.ndarray],
    spacing: tuple[float, ...],
) -> _Tumour:
    voxel = max(spacing)
    core = rng.uniform(9, 20)
    whole = core + rng.uniform(6, 18)
    rim = max(3.0, 1.1 * voxel)
    if grade == "HGG":
        necrosis = min(core * rng.uniform(0.3, 0.75), core - rim)
        enhancing_threshold = rng.uniform(-1.6, -0.6)
    else:
        necrosis = min(core * rng.uniform(0.0, 0.3), core - rim)
        enhancing_threshold = np.inf if rng.uniform() < 0.5 else rng.uniform(0.6, 1.2)
    inside = _inside_distance(anatomy["brain"] > 0.5, _COARSE_SPACING_MM)
    margin = min(30.0, 0.8 * whole)
    candidates = (anatomy["wm"] > 0.6) & (inside >= margin)
    while not candidates.any():  # tiny or odd brains: relax the margin
        margin /= 2
        candidates = (anatomy["wm"] > 0.3) & (inside >= margin)
    return _Tumour(
        centre=_pick(rng, coarse, candidates),
        rotation=_rotation(rng.uniform(-np.pi, np.pi, size=3)),
        axes=rng.uniform(0.8, 1.25, size=3),
        core_mm=float(core),
        necrosis_mm=float(max(necrosis, 0.0)),
        whole_mm=float(whole),
        edema_width_mm=float(rng.uniform(2.0, 5.0)),
        irregularity=tuple(float(a) for a in rng.uniform([0.12, 0.15, 0.15], [0.3, 0.35, 0.3])),
        enhancing_threshold=float(enhancing_threshold),
        mass=float(rng.uniform(0.15, 0.45)),
    )


def _mass_displacement(grid: _Grid, tumour: _Tumour) -> np.ndarray:
    """[3, X, Y, Z] mm subtracted from sampling points: tissue moves away from the centre."""
    offsets = grid.points() - tumour.centre.astype(np.float32)[:, None, None, None]
    sigma = 1.3 * tumour.whole_mm
    falloff = np.exp(-(offsets**2).sum(axis=0) / sigma**2)
    return offsets * (tumour.mass * falloff)[None]


def _tumour_maps(
    tumour: _Tumour,
    grid: _Grid,
    anatomy: dict[str, np.ndarray],
    fields: dict[str, Callable[[_Grid], np.ndarray]],
    spacing: tuple[float, ...],
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Voxel fractions of each tissue, canonical label and soft whole-tumour probability."""
    radius = _ellipsoid_radius(grid, tumour.centre, tumour.rotation, tumour.axes)
    a_core, a_nec, a_ed = tumour.irregularity
    width = 0.5 + 0.25 * min(spacing)  # partial-volume ramp of the core's borders
    brain = anatomy["brain"]
    csf_rel = anatomy["csf"] / np.maximum(brain, 1e-6)
    wm_rel = anatomy["wm"] / np.maximum(brain, 1e-6)

    core_radius = radius * np.exp(-a_core * fields["core"](grid))
    core_logit = (tumour.core_mm - core_radius) / width
    core_p = _sigmoid(core_logit)
    nec_p = _sigmoid((tumour.necrosis_mm - radius * np.exp(-a_nec * fields["nec"](grid))) / width)
    if tumour.necrosis_mm <= 0:
        nec_p = np.zeros_like(nec_p)
    enh_p = _sigmoid((fields["patch"](grid) - tumour.enhancing_threshold) / 0.15)
    # Edema wraps the core, reaching (whole - core) mm beyond it on average, further along
    # white matter than in grey matter or CSF (where its reach shrinks by up to 40%).
    beyond_core = (core_radius - tumour.core_mm) * np.exp(-a_ed * fields["edema"](grid))
    beyond_core /= 0.6 + 0.4 * wm_rel
    edema_logit = (tumour.whole_mm - tumour.core_mm - beyond_core) / tumour.edema_width_mm
    resist = 1.0 - 0.8 * csf_rel  # ventricles and sulci resist edema
    edema_p = _sigmoid(edema_logit) * resist

    core = core_p * brain
    fractions = {
        "necrosis": core * nec_p,
        "enhancing": core * (1 - nec_p) * enh_p,
        "non_enhancing": core * (1 - nec_p) * (1 - enh_p),
        "edema": edema_p * (brain - core),
    }
    normal = 1.0 - core_p - edema_p * (1 - core_p)
    for tissue in ("csf", "gm", "wm"):
        fractions[tissue] = anatomy[tissue] * normal

    # The rater moves the borders by a smooth shift of a few mm (edema fully, core half).
    rater_mm = fields["rater_mm"] * fields["rater"](grid)
    brain_mask = brain > 0.5
    tc = core_logit + 0.5 * rater_mm / width > 0
    wt = (_sigmoid(edema_logit + rater_mm / tumour.edema_width_mm) * resist > 0.5) | tc
    enhancing = (1 - nec_p) * enh_p > np.maximum(nec_p, (1 - nec_p) * (1 - enh_p))
    label = np.full(grid.shape, BACKGROUND, dtype=np.uint8)
    label[wt] = EDEMA
    label[tc] = CORE
    label[tc & enhancing] = ENHANCING
    label[~brain_mask] = BACKGROUND
    probability = np.clip(fractions["edema"] + core, 0, 1) * brain_mask
    return fractions, label, probability.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Lesion domain


def _draw_lesion_sites(
    rng: np.random.Generator, coarse: _Grid, anatomy: dict[str, np.ndarray], voxel: float
) -> list[tuple[np.ndarray, float, bool]]:
    """3-10 (centre, radius_mm, has_core) tuples, mostly periventricular, not touching."""
    brain = anatomy["brain"] > 0.5
    inside = _inside_distance(brain, _COARSE_SPACING_MM)
    ventricles = (anatomy["csf"] > 0.5) & (inside >= 20)
    near_ventricle = _inside_distance(~ventricles, _COARSE_SPACING_MM) <= 12
    deep_wm = (anatomy["wm"] > 0.6) & (inside >= 10)
    periventricular = (anatomy["wm"] > 0.4) & near_ventricle & (inside >= 8)
    if not periventricular.any():
        periventricular = deep_wm
    r_min, r_max = max(3.0, 0.9 * voxel), max(8.0, 2.2 * voxel)
    sites: list[tuple[np.ndarray, float, bool]] = []
    for _ in range(int(rng.integers(3, 11))):
        radius = float(rng.uniform(r_min, r_max))
        has_core = bool(radius > 0.6 * (r_min + r_max) and rng.uniform() < 0.5)
        pool = periventricular if rng.uniform() < 0.6 else deep_wm
        for _attempt in range(50):
            centre = _pick(rng, coarse, pool)
            if all(np.linalg.norm(centre - c) > radius + r + 2 * voxel for c, r, _ in sites):
                sites.append((centre, radius, has_core))
                break
    return sites


def _lesion_maps(
    sites: list[tuple[np.ndarray, float, bool]],
    rng: np.random.Generator,
    grid: _Grid,
    anatomy: dict[str, np.ndarray],
    fields: dict[str, Callable[[_Grid], np.ndarray]],
    spacing: tuple[float, ...],
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    brain = anatomy["brain"]
    csf_rel = anatomy["csf"] / np.maximum(brain, 1e-6)
    shape_noise = fields["core"](grid)
    rater_mm = fields["rater_mm"] * fields["rater"](grid)
    width = 0.5 + 0.2 * min(spacing)
    lesion_p = np.zeros(grid.shape, np.float32)
    labelled = np.zeros(grid.shape, np.float32)
    core_p = np.zeros(grid.shape, np.float32)
    for centre, radius_mm, has_core in sites:
        rotation = _rotation(rng.uniform(-np.pi, np.pi, size=3))
        axes = rng.uniform(0.7, 1.4, size=3)
        radius = _ellipsoid_radius(grid, centre, rotation, axes) * np.exp(-0.25 * shape_noise)
        lesion_p = np.maximum(lesion_p, _sigmoid((radius_mm - radius) / width))
        # The rater's border shift is capped at 40% of the radius, so no lesion disappears.
        shift = np.clip(rater_mm, -0.4 * radius_mm, 0.4 * radius_mm)
        labelled = np.maximum(labelled, _sigmoid((radius_mm - radius + shift) / width))
        if has_core:
            core_p = np.maximum(core_p, _sigmoid((0.5 * radius_mm - radius) / width))
    resist = 1.0 - 0.8 * csf_rel
    lesion_p *= resist
    lesion = lesion_p * brain
    fractions = {"lesion": lesion * (1 - core_p), "lesion_core": lesion * core_p}
    for tissue in ("csf", "gm", "wm"):
        fractions[tissue] = anatomy[tissue] * (1 - lesion_p)

    brain_mask = brain > 0.5
    label = np.full(grid.shape, BACKGROUND, dtype=np.uint8)
    label[labelled * resist > 0.5] = EDEMA
    label[(label == EDEMA) & (core_p > 0.5)] = CORE
    label[~brain_mask] = BACKGROUND
    return fractions, label, (lesion * brain_mask).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Images


def _render(
    fractions: dict[str, np.ndarray],
    brain_mask: np.ndarray,
    grid: _Grid,
    contrast_rng: np.random.Generator,
    scanner_rng: np.random.Generator,
    noise_rng: np.random.Generator,
    scanner_fields: _FieldSampler,
    texture: np.ndarray,
) -> dict[str, np.ndarray]:
    """Tissue fractions -> four scanner-like modalities ([X, Y, Z] float32 each)."""
    images = {}
    for modality in MODALITIES:
        means = np.asarray(_MEANS[modality]) * np.exp(contrast_rng.normal(0, 0.04, len(_TISSUES)))
        clean = np.zeros(grid.shape, np.float32)
        for tissue, mean in zip(_TISSUES, means, strict=True):
            if tissue in fractions:
                clean += np.float32(mean) * fractions[tissue]
        clean *= 1.0 + 0.04 * texture
        clean = ndimage.gaussian_filter(clean, sigma=0.5, mode="constant")  # partial volume
        gain = np.exp(scanner_rng.uniform(np.log(300.0), np.log(3000.0)))
        bias = np.exp(scanner_rng.uniform(0.03, 0.12) * scanner_fields.draw(90.0)(grid))
        signal = gain * bias * clean
        sigma = scanner_rng.uniform(0.015, 0.045) * gain
        real = signal + sigma * noise_rng.standard_normal(grid.shape, dtype=np.float32)
        imaginary = sigma * noise_rng.standard_normal(grid.shape, dtype=np.float32)
        images[modality] = (np.hypot(real, imaginary) * brain_mask).astype(np.float32)
    return images


def generate_case(config: SyntheticConfig, index: int) -> SyntheticCase:
    """Generates case `index` of the dataset described by `config` (pure, deterministic).

    Args:
      config: grid, domain and seed.
      index: case number, >= 0.

    Returns:
      The case with canonical labels, four float32 modalities and the shared affine.
    """
    if index < 0:
        raise ValueError(f"case index must be >= 0; got {index}")
    domain_code = DOMAINS.index(config.domain)
    sequence = np.random.SeedSequence((config.seed, index, domain_code))
    anatomy_rng, lesion_rng, field_rng, contrast_rng, scanner_rng, noise_rng = (
        np.random.default_rng(s) for s in sequence.spawn(6)
    )
    fields = _FieldSampler(config, field_rng)
    grid, coarse = _output_grid(config), _coarse_grid(config)
    template = _load_template(_template_factor(config.spacing))

    warp = _draw_warp(anatomy_rng, fields)
    # Sites are chosen on a fixed coarse grid and template, so they do not depend on `shape`.
    coarse_template = _load_template(_template_factor(coarse.spacing))
    coarse_anatomy = _sample_anatomy(warp, coarse, coarse_template)
    named = {
        "core": fields.draw(14.0),
        "nec": fields.draw(10.0),
        "edema": fields.draw(22.0),
        "patch": fields.draw(10.0),
        "rater": fields.draw(8.0),
        "rater_mm": float(field_rng.uniform(1.0, 3.0)),
    }
    texture = fields.draw(5.0)(grid)
    if config.domain == "tumour":
        grade = case_grade(index)
        tumour = _draw_tumour(anatomy_rng, grade, coarse, coarse_anatomy, config.spacing)
        mass = _mass_displacement(grid, tumour) if config.mass_effect else None
        anatomy = _sample_anatomy(warp, grid, template, mass)
        fractions, label, probability = _tumour_maps(tumour, grid, anatomy, named, config.spacing)
    else:
        grade = None
        sites = _draw_lesion_sites(lesion_rng, coarse, coarse_anatomy, max(config.spacing))
        anatomy = _sample_anatomy(warp, grid, template)
        fractions, label, probability = _lesion_maps(
            sites, lesion_rng, grid, anatomy, named, config.spacing
        )
    brain_mask = anatomy["brain"] > 0.5
    scanner_fields = _FieldSampler(config, scanner_rng)
    images = _render(
        fractions, brain_mask, grid, contrast_rng, scanner_rng, noise_rng, scanner_fields, texture
    )
    return SyntheticCase(
        index=index,
        label=label,
        images=images,
        affine=config.affine,
        brain_mask=brain_mask,
        tumour_probability=probability,
        tissue_fractions={t: fractions[t].astype(np.float32) for t in ("csf", "gm", "wm")},
        grade=grade,
    )


# --------------------------------------------------------------------------------------------
# Writing in release layouts


def case_id(layout: str, index: int) -> str:
    """The case identifier a release would use for case `index` (0-based).

    brats2018 `Brats18_SYN_0001_1`, brats2020 `BraTS20_Training_001`, brats2021
    `BraTS2021_00000`, brats2023 `BraTS-GLI-00000-000`, msd `BRATS_001`.
    """
    get_layout(layout)
    return {
        "brats2018": f"Brats18_SYN_{index + 1:04d}_1",
        "brats2020": f"BraTS20_Training_{index + 1:03d}",
        "brats2021": f"BraTS2021_{index:05d}",
        "brats2023": f"BraTS-GLI-{index:05d}-000",
        "msd": f"BRATS_{index + 1:03d}",
    }[layout]


def case_files(layout: str, index: int) -> dict[str, str]:
    """Relative paths of case `index`'s files in `layout`.

    BraTS layouts map each canonical modality and `"seg"` to a path
    (`[HGG|LGG/]<case>/<case><sep><suffix>.nii.gz`; brats2018 puts `case_grade(index)` first);
    msd maps `"image"` (4D) and `"label"`.
    """
    spec = get_layout(layout)
    name = case_id(layout, index)
    if layout == "msd":
        return {"image": f"imagesTr/{name}.nii.gz", "label": f"labelsTr/{name}.nii.gz"}
    folder = f"{case_grade(index)}/{name}" if layout == "brats2018" else name
    files = {
        modality: f"{folder}/{name}{spec.separator}{spec.modality_suffixes[modality]}.nii.gz"
        for modality in MODALITIES
    }
    files["seg"] = f"{folder}/{name}{spec.separator}{spec.label_suffix}.nii.gz"
    return files


def write_case(root: str | os.PathLike, case: SyntheticCase, layout: str) -> list[Path]:
    """Writes one case under `root` in `layout` (labels converted to the release's values)."""
    spec = get_layout(layout)
    root = Path(root)
    files = case_files(layout, case.index)
    labels = spec.convention.from_canonical(case.label)
    if layout == "msd":
        channels = sorted(MODALITIES, key=lambda m: spec.modality_suffixes[m])
        image = np.stack([case.images[m] for m in channels], axis=-1)
        return [
            write_nifti(root / files["image"], image, affine=case.affine),
            write_nifti(root / files["label"], labels, affine=case.affine, kind="label"),
        ]
    written = [
        write_nifti(root / files[modality], case.images[modality], affine=case.affine)
        for modality in MODALITIES
    ]
    written.append(write_nifti(root / files["seg"], labels, affine=case.affine, kind="label"))
    return written


def _msd_dataset_json(num_cases: int, domain: str) -> dict:
    spec = get_layout("msd")
    names = {0: "background", 1: "edema", 2: "non-enhancing tumor", 3: "enhancing tumour"}
    training = []
    for index in range(num_cases):
        files = case_files("msd", index)
        training.append({"image": f"./{files['image']}", "label": f"./{files['label']}"})
    return {
        "name": "BRATS",
        "description": f"Synthetic vi_seg_jax cases ({domain}) in the MSD Task01 layout",
        "reference": "vi_seg_jax.data.synthetic (MNI152 2009c template via nilearn)",
        "licence": "CC-BY-SA 4.0",
        "release": "synthetic",
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {str(v): names[v] for v in spec.convention.release_labels if v in names},
        "numTraining": num_cases,
        "numTest": 0,
        "training": training,
        "test": [],
    }


def _check_destination(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(out, "exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(out, "already exists and is not empty (pass --overwrite to replace it)")


def _summary(case: SyntheticCase) -> str:
    brain = max(int(case.brain_mask.sum()), 1)
    counts = np.bincount(case.label.ravel(), minlength=4)
    wt = counts[1:4].sum() / brain
    if case.grade is None:
        lesions = ndimage.label(case.label > 0)[1]
        return f"{lesions} lesions, {100 * wt:.2f}% of brain"
    return f"{case.grade}, WT {100 * wt:.1f}% of brain, ET {100 * counts[3] / brain:.1f}%"


def write_dataset(
    out_dir: str | os.PathLike,
    *,
    num_cases: int,
    layout: str = "brats2021",
    domain: str = "tumour",
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    seed: int = 0,
    mass_effect: bool = True,
    overwrite: bool = False,
    progress: bool | Callable[[str], None] | None = None,
) -> list[str]:
    """Generates `num_cases` cases and writes them to `out_dir` in a release layout.

    Everything is written into a hidden sibling folder (`.<name>.partial-XXXX`) that is renamed
    to `out_dir` at the end, so an interrupted run leaves nothing under the final name.

    Args:
      out_dir: destination folder; must be missing or empty unless `overwrite`.
      num_cases: number of cases, >= 1.
      layout: `brats2018`, `brats2020`, `brats2021`, `brats2023` or `msd`.
      domain: `tumour` or `lesions`.
      shape: output grid [X, Y, Z] (default (64, 64, 48)).
      seed: dataset seed.
      mass_effect: tumours push the surrounding tissue away.
      overwrite: replace a non-empty `out_dir`.
      progress: a function called with one line per written case, or True to print those
        lines to stderr.

    Returns:
      The case ids (see `case_id`; brats2018 cases lie under `HGG/` or `LGG/`).

    Raises:
      DataError: `out_dir` is not empty (and not `overwrite`) or is a file.
      ValueError: bad layout, domain, shape or number of cases.
    """
    if num_cases < 1:
        raise ValueError(f"num_cases must be >= 1; got {num_cases}")
    if progress is True:
        progress = _print_to_stderr
    elif not progress:
        progress = None
    get_layout(layout)
    config = SyntheticConfig(shape=shape, domain=domain, seed=seed, mass_effect=mass_effect)
    out = Path(out_dir)
    _check_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    partial.mkdir()
    try:
        ids = []
        for index in range(num_cases):
            start = time.perf_counter()
            case = generate_case(config, index)
            write_case(partial, case, layout)
            ids.append(case_id(layout, index))
            if progress is not None:
                seconds = time.perf_counter() - start
                progress(f"{ids[-1]}: {_summary(case)} ({seconds:.1f} s)")
        if layout == "msd":
            text = json.dumps(_msd_dataset_json(num_cases, domain), indent=4)
            (partial / "dataset.json").write_text(text + "\n")
        _move_into_place(partial, out, overwrite)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return ids


def _print_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _move_into_place(partial: Path, out: Path, overwrite: bool) -> None:
    _check_destination(out, overwrite)  # another writer may have finished meanwhile
    if not out.exists():
        os.replace(partial, out)
        return
    old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
    os.replace(out, old)
    os.replace(partial, out)
    shutil.rmtree(old, ignore_errors=True)
