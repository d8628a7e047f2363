"""What a synthetic dataset is: its grid, domain and seed, and the constants that fix them."""

from __future__ import annotations

import dataclasses

import numpy as np

from vi_seg_jax.data.synthetic.shift import Shift

# Bump whenever the same configuration starts producing different arrays (it names caches).
GENERATOR_VERSION = 1
DEFAULT_SHAPE = (64, 64, 48)
BRATS_FOV_MM = (240.0, 240.0, 155.0)
DOMAINS = ("tumour", "lesions")
MIN_SIZE = 16  # smallest grid size per axis

# World point (mm, MNI-like RAS) at the centre of the output grid: the centre of the template's
# brain (x -72..72, y -107..73, z -72..82 mm), shifted up a little to spare the vertex.
GRID_CENTRE_MM = np.array([0.0, -17.0, 8.0])
COARSE_SPACING_MM = 4.0  # shape-independent grid on which lesion and tumour sites are chosen


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
      shift: a graded distribution shift (see `shift.py`), a `Shift` or `"KIND:LEVEL"`; None
        or level 0 is no shift. `anatomy` needs the tumour domain.
    """

    shape: tuple[int, int, int] = DEFAULT_SHAPE
    domain: str = "tumour"
    seed: int = 0
    mass_effect: bool = True
    fov_mm: tuple[float, float, float] = BRATS_FOV_MM
    shift: Shift | None = None

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
        shift = Shift.parse(self.shift) if isinstance(self.shift, str) else self.shift
        if shift is not None and not isinstance(shift, Shift):
            raise ValueError(f"shift must be a Shift, 'KIND:LEVEL' or None; got {self.shift!r}")
        if shift is not None and shift.kind == "anatomy" and self.domain != "tumour":
            raise ValueError(f"the anatomy shift needs domain 'tumour'; got {self.domain!r}")
        object.__setattr__(self, "shift", shift)
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
        affine[:3, 3] = GRID_CENTRE_MM - spacing * (np.asarray(self.shape) - 1) / 2
        return affine
