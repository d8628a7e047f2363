"""Each case's brain: the MNI152 template, randomly warped and resampled onto the case's grid.

The template is the 2009c symmetric T1 with its grey- and white-matter probability maps, as
shipped inside nilearn; CSF is whatever part of the brain mask neither map claims.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage

from vi_seg_jax.data.synthetic.config import GRID_CENTRE_MM
from vi_seg_jax.data.synthetic.fields import FieldSampler, Grid
from vi_seg_jax.errors import DataError
from vi_seg_jax.io.nifti import read_nifti

_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
_BRAIN_THRESHOLD = 10.0  # template T1 (0-255) above this is brain (it is skull-stripped)


@dataclasses.dataclass(frozen=True)
class Template:
    """The template's tissue maps on its own (block-averaged) voxel grid."""

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
def load_template(factor: int) -> Template:
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
    return Template(
        brain=_block_mean(brain, factor).astype(np.float32),
        gm=_block_mean(gm, factor).astype(np.float32),
        wm=_block_mean(wm, factor).astype(np.float32),
        world_to_voxel=np.linalg.inv(affine),
    )


def template_factor(spacing: tuple[float, ...]) -> int:
    """Block-averaging factor of the 1 mm template for an output grid of `spacing` mm."""
    return max(1, int(min(spacing) / 1.5))


@dataclasses.dataclass(frozen=True)
class Warp:
    """Output world point p -> template world point: C + M (p + d(p) - mass(p) - C - t)."""

    matrix: np.ndarray  # [3, 3] inverse of rotation @ scaling
    translation: np.ndarray  # [3]
    displacement: tuple[Callable[[Grid], np.ndarray], ...]  # 3 fields, mm
    displacement_mm: float


def rotation_matrix(angles: np.ndarray) -> np.ndarray:
    """[3, 3] rotation by `angles` (radians) about x, then y, then z."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def draw_warp(rng: np.random.Generator, fields: FieldSampler) -> Warp:
    """A random rigid-plus-scaling map and smooth displacement from a case to the template."""
    # BraTS brains are rigidly registered to an atlas: small rotations (mostly about z). The
    # MNI152 brain is larger than the average adult brain, hence the global shrink.
    rotation = rotation_matrix(np.deg2rad(rng.uniform(-1, 1, size=3) * np.array([5.0, 5.0, 8.0])))
    scaling = rng.uniform(0.84, 0.95) * rng.uniform(0.96, 1.04, size=3)
    matrix = np.linalg.inv(rotation @ np.diag(scaling))
    translation = rng.uniform(-1, 1, size=3) * np.array([6.0, 6.0, 3.0])
    displacement = tuple(fields.draw(40.0) for _ in range(3))
    return Warp(matrix, translation, displacement, float(rng.uniform(2.0, 4.5)))


def sample_anatomy(
    warp: Warp, grid: Grid, template: Template, mass: np.ndarray | None = None
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
        @ (GRID_CENTRE_MM - warp.matrix @ (GRID_CENTRE_MM + warp.translation))
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


def template_points(warp: Warp, grid: Grid) -> np.ndarray:
    """[3, X, Y, Z] float64 template world coordinates (MNI mm) of `grid`'s voxel centres.

    The same map as `sample_anatomy` without mass effect; used to place tumours in named
    regions of the template (e.g. the posterior fossa).
    """
    points = grid.points().astype(np.float64)
    for d in range(3):
        points[d] += warp.displacement_mm * warp.displacement[d](grid)
    centred = points.reshape(3, -1) - (GRID_CENTRE_MM + warp.translation)[:, None]
    return (GRID_CENTRE_MM[:, None] + warp.matrix @ centred).reshape(points.shape)
