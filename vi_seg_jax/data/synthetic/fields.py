"""Sampling grids in world millimetres and the smooth random fields drawn on them.

Fields are cubic B-splines on lattices fixed in world mm, so a field does not depend on the
output shape; they are evaluated separably on axis-aligned grids (cheap even at
240 x 240 x 155).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from vi_seg_jax.data.synthetic.config import (
    COARSE_SPACING_MM,
    GRID_CENTRE_MM,
    MIN_SIZE,
    SyntheticConfig,
)


@dataclasses.dataclass(frozen=True)
class Grid:
    """An axis-aligned grid of voxel centres in world mm."""

    axes: tuple[np.ndarray, np.ndarray, np.ndarray]  # world mm of voxel centres per axis
    spacing: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(len(a) for a in self.axes)

    def points(self) -> np.ndarray:
        """[3, X, Y, Z] float32 world coordinates."""
        return np.stack(np.meshgrid(*self.axes, indexing="ij")).astype(np.float32)


def output_grid(config: SyntheticConfig) -> Grid:
    """The case's voxel grid (`config.shape` over `config.fov_mm`)."""
    affine = config.affine
    axes = tuple(
        (affine[d, 3] + affine[d, d] * np.arange(n)).astype(np.float32)
        for d, n in enumerate(config.shape)
    )
    return Grid(axes, config.spacing)


def coarse_grid(config: SyntheticConfig) -> Grid:
    """A grid of about `COARSE_SPACING_MM` over the same field of view, whatever the shape."""
    shape = tuple(max(2, round(f / COARSE_SPACING_MM)) for f in config.fov_mm)
    coarse = dataclasses.replace(config, shape=tuple(max(s, MIN_SIZE) for s in shape))
    return output_grid(coarse)


def _fov_box(config: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    half = np.asarray(config.fov_mm) / 2
    return GRID_CENTRE_MM - half, GRID_CENTRE_MM + half


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


class FieldSampler:
    """Draws unit-variance smooth Gaussian fields with a given feature size (lattice spacing)."""

    def __init__(self, config: SyntheticConfig, rng: np.random.Generator):
        self._box = _fov_box(config)
        self._rng = rng

    def draw(self, spacing_mm: float) -> Callable[[Grid], np.ndarray]:
        lo, hi = self._box
        origin = lo - 2 * spacing_mm
        n = np.ceil((hi - lo) / spacing_mm).astype(int) + 5
        lattice = self._rng.standard_normal(tuple(n)).astype(np.float32)

        def on_grid(grid: Grid) -> np.ndarray:
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
