"""What each domain draws on the anatomy: a glioma (`"tumour"`) or MS-like lesions (`"lesions"`).

Each domain turns a case's tissue fractions into fractions of normal and abnormal tissue,
the canonical label (after the rater's border shift) and the soft probability (before it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

from vi_seg_jax.data.conventions import BACKGROUND, CORE, EDEMA, ENHANCING
from vi_seg_jax.data.synthetic.anatomy import rotation_matrix
from vi_seg_jax.data.synthetic.config import COARSE_SPACING_MM
from vi_seg_jax.data.synthetic.fields import Grid
from vi_seg_jax.data.synthetic.shift import (
    LARGE_SCALE,
    LOCATIONS,
    MULTIFOCAL_PRIMARY_SCALE,
    SATELLITE_WHOLE_MM,
    SMALL_SCALE,
)


def _inside_distance(mask: np.ndarray, spacing: float) -> np.ndarray:
    return ndimage.distance_transform_edt(mask, sampling=spacing)


def _pick(rng: np.random.Generator, grid: Grid, candidates: np.ndarray) -> np.ndarray:
    """World mm of a random candidate voxel, jittered within the voxel."""
    index = np.argwhere(candidates)[rng.integers(candidates.sum())]
    centre = np.array([grid.axes[d][index[d]] for d in range(3)], dtype=np.float64)
    return centre + rng.uniform(-0.5, 0.5, size=3) * COARSE_SPACING_MM


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)


def _ellipsoid_radius(
    grid: Grid, centre: np.ndarray, rotation: np.ndarray, axes: np.ndarray
) -> np.ndarray:
    """[X, Y, Z] ellipsoidal distance (mm) from `centre` with semi-axes scaled by `axes`."""
    offsets = grid.points() - centre.astype(np.float32)[:, None, None, None]
    local = np.einsum("dk,dxyz->kxyz", (rotation / axes[None, :]).astype(np.float32), offsets)
    return np.sqrt((local**2).sum(axis=0))


@dataclasses.dataclass(frozen=True)
class Tumour:
    """One glioma's shape and appearance, drawn once per case."""

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


def draw_tumour(
    rng: np.random.Generator,
    grade: str,
    coarse: Grid,
    anatomy: dict[str, np.ndarray],
    spacing: tuple[float, ...],
) -> Tumour:
    """A tumour of `grade` centred in white matter well inside the brain."""
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
    inside = _inside_distance(anatomy["brain"] > 0.5, COARSE_SPACING_MM)
    margin = min(30.0, 0.8 * whole)
    candidates = (anatomy["wm"] > 0.6) & (inside >= margin)
    while not candidates.any():  # tiny or odd brains: relax the margin
        margin /= 2
        candidates = (anatomy["wm"] > 0.3) & (inside >= margin)
    return Tumour(
        centre=_pick(rng, coarse, candidates),
        rotation=rotation_matrix(rng.uniform(-np.pi, np.pi, size=3)),
        axes=rng.uniform(0.8, 1.25, size=3),
        core_mm=float(core),
        necrosis_mm=float(max(necrosis, 0.0)),
        whole_mm=float(whole),
        edema_width_mm=float(rng.uniform(2.0, 5.0)),
        irregularity=tuple(float(a) for a in rng.uniform([0.12, 0.15, 0.15], [0.3, 0.35, 0.3])),
        enhancing_threshold=float(enhancing_threshold),
        mass=float(rng.uniform(0.15, 0.45)),
    )


def _as_foci(tumours: Tumour | Sequence[Tumour]) -> list[Tumour]:
    foci = [tumours] if isinstance(tumours, Tumour) else list(tumours)
    if not foci:
        raise ValueError("at least one tumour focus is needed")
    return foci


def mass_displacement(grid: Grid, tumours: Tumour | Sequence[Tumour]) -> np.ndarray:
    """[3, X, Y, Z] mm subtracted from sampling points: tissue moves away from each focus."""
    total = None
    for tumour in _as_foci(tumours):
        offsets = grid.points() - tumour.centre.astype(np.float32)[:, None, None, None]
        sigma = 1.3 * tumour.whole_mm
        falloff = np.exp(-(offsets**2).sum(axis=0) / sigma**2)
        push = offsets * (tumour.mass * falloff)[None]
        total = push if total is None else total + push
    return total


def tumour_maps(
    tumours: Tumour | Sequence[Tumour],
    grid: Grid,
    anatomy: dict[str, np.ndarray],
    fields: dict[str, Callable[[Grid], np.ndarray]],
    spacing: tuple[float, ...],
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Voxel fractions of each tissue, canonical label and soft whole-tumour probability.

    `tumours` is one tumour or several foci (a multifocal tumour, primary first); the foci's
    core and edema logits and necrosis and enhancement maps are combined by maximum, so one
    focus gives exactly the single-tumour maps.
    """
    width = 0.5 + 0.25 * min(spacing)  # partial-volume ramp of the core's borders
    brain = anatomy["brain"]
    csf_rel = anatomy["csf"] / np.maximum(brain, 1e-6)
    wm_rel = anatomy["wm"] / np.maximum(brain, 1e-6)
    resist = 1.0 - 0.8 * csf_rel  # ventricles and sulci resist edema
    rater_mm = fields["rater_mm"] * fields["rater"](grid)
    noise = {name: fields[name](grid) for name in ("core", "nec", "patch", "edema")}

    core_logit = nec_p = enh_p = edema_sig = rater_sig = None
    for tumour in _as_foci(tumours):
        radius = _ellipsoid_radius(grid, tumour.centre, tumour.rotation, tumour.axes)
        a_core, a_nec, a_ed = tumour.irregularity
        core_radius = radius * np.exp(-a_core * noise["core"])
        focus_core = (tumour.core_mm - core_radius) / width
        focus_nec = _sigmoid((tumour.necrosis_mm - radius * np.exp(-a_nec * noise["nec"])) / width)
        if tumour.necrosis_mm <= 0:
            focus_nec = np.zeros_like(focus_nec)
        focus_enh = _sigmoid((noise["patch"] - tumour.enhancing_threshold) / 0.15)
        # Edema wraps the core, reaching (whole - core) mm beyond it on average, further along
        # white matter than in grey matter or CSF (where its reach shrinks by up to 40%).
        beyond_core = (core_radius - tumour.core_mm) * np.exp(-a_ed * noise["edema"])
        beyond_core /= 0.6 + 0.4 * wm_rel
        edema_logit = (tumour.whole_mm - tumour.core_mm - beyond_core) / tumour.edema_width_mm
        focus_edema = _sigmoid(edema_logit)
        # The rater moves the borders by a smooth shift of a few mm (edema fully, core half).
        focus_rater = _sigmoid(edema_logit + rater_mm / tumour.edema_width_mm)
        if core_logit is None:
            core_logit, nec_p, enh_p = focus_core, focus_nec, focus_enh
            edema_sig, rater_sig = focus_edema, focus_rater
        else:
            core_logit = np.maximum(core_logit, focus_core)
            nec_p = np.maximum(nec_p, focus_nec)
            enh_p = np.maximum(enh_p, focus_enh)
            edema_sig = np.maximum(edema_sig, focus_edema)
            rater_sig = np.maximum(rater_sig, focus_rater)
    core_p = _sigmoid(core_logit)
    edema_p = edema_sig * resist

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

    brain_mask = brain > 0.5
    tc = core_logit + 0.5 * rater_mm / width > 0
    wt = (rater_sig * resist > 0.5) | tc
    enhancing = (1 - nec_p) * enh_p > np.maximum(nec_p, (1 - nec_p) * (1 - enh_p))
    label = np.full(grid.shape, BACKGROUND, dtype=np.uint8)
    label[wt] = EDEMA
    label[tc] = CORE
    label[tc & enhancing] = ENHANCING
    label[~brain_mask] = BACKGROUND
    probability = np.clip(fractions["edema"] + core, 0, 1) * brain_mask
    return fractions, label, probability.astype(np.float32)


def _rim_mm(spacing: tuple[float, ...]) -> float:
    return max(3.0, 1.1 * max(spacing))


def _scaled(tumour: Tumour, factor: float, rim: float) -> Tumour:
    """`tumour` with every radius times `factor` (necrosis still inside a `rim`-thick rim)."""
    core = tumour.core_mm * factor
    necrosis = max(0.0, min(tumour.necrosis_mm * factor, core - rim))
    return dataclasses.replace(
        tumour,
        core_mm=float(core),
        necrosis_mm=float(necrosis) if tumour.necrosis_mm > 0 else 0.0,
        whole_mm=float(tumour.whole_mm * factor),
        edema_width_mm=float(tumour.edema_width_mm * min(1.0, factor)),
    )


def _reach_mm(tumour: Tumour) -> float:
    """A generous bound on how far a focus's label reaches (irregular, rater-shifted edema)."""
    return 1.5 * tumour.whole_mm * float(np.max(tumour.axes)) + 4.0


def location_region(
    level: int, anatomy: dict[str, np.ndarray], mni: np.ndarray, spacing_mm: float
) -> np.ndarray:
    """[X, Y, Z] bool candidate centres of a `location`-shifted tumour at `level` (1-3).

    Regions are taken in template (MNI) coordinates `mni` [3, X, Y, Z]: 1 juxtacortical
    (supratentorial, 4-12 mm under the brain surface), 2 a cerebellar hemisphere (y < -45,
    z < -22, |x| > 20 mm), 3 the brainstem (|x| < 8, -42 < y < -15, z < -20 mm).
    """
    x, y, z = mni
    brain = anatomy["brain"] > 0.5
    inside = _inside_distance(brain, spacing_mm)
    infratentorial = ((y < -38) & (z < -18)) | ((np.abs(x) < 14) & (y < -12) & (z < -20))
    if LOCATIONS[level] == "juxtacortical":
        region = brain & ~infratentorial & (inside >= 4) & (inside <= 12)
        return region & (anatomy["wm"] + anatomy["gm"] > 0.5 * anatomy["brain"])
    if LOCATIONS[level] == "cerebellar hemisphere":
        return brain & (y < -45) & (z < -22) & (np.abs(x) > 20) & (inside >= 8)
    return brain & (np.abs(x) < 8) & (y > -42) & (y < -15) & (z < -20) & (inside >= 4)


def shift_tumour(
    tumour: Tumour,
    mode: str,
    level: int,
    rng: np.random.Generator,
    coarse: Grid,
    anatomy: dict[str, np.ndarray],
    mni: np.ndarray,
    spacing: tuple[float, ...],
) -> list[Tumour]:
    """The foci of `tumour` after an anatomy shift of `mode` at `level` (see `shift.py`).

    Args:
      tumour: the unshifted tumour (as `draw_tumour` drew it).
      mode: `small`, `large`, `multifocal` or `location`.
      level: 0-3; 0 returns `[tumour]`.
      rng: the shift's own stream.
      coarse: the site-selection grid; `anatomy` and `mni` ([3, X, Y, Z] template mm) live on it.
      spacing: output voxel size in mm (sets the enhancing rim's minimum thickness).

    Returns:
      The foci, primary first (one focus except for `multifocal`).
    """
    if level == 0:
        return [tumour]
    rim = _rim_mm(spacing)
    if mode == "small":
        return [_scaled(tumour, SMALL_SCALE[level], rim)]
    if mode == "large":
        return [_scaled(tumour, LARGE_SCALE[level], rim)]
    if mode == "location":
        region = location_region(level, anatomy, mni, COARSE_SPACING_MM)
        if not region.any():  # an odd field of view: keep the usual site
            return [tumour]
        return [dataclasses.replace(tumour, centre=_pick(rng, coarse, region))]
    if mode != "multifocal":
        raise ValueError(f"unknown anatomy-shift mode {mode!r}")
    primary = _scaled(tumour, MULTIFOCAL_PRIMARY_SCALE[level], rim)
    foci = [primary]
    pool = (anatomy["wm"] > 0.5) & (
        _inside_distance(anatomy["brain"] > 0.5, COARSE_SPACING_MM) >= 8
    )
    for _ in range(level):
        whole = float(rng.uniform(*SATELLITE_WHOLE_MM))
        satellite = dataclasses.replace(
            primary,
            rotation=rotation_matrix(rng.uniform(-np.pi, np.pi, size=3)),
            axes=rng.uniform(0.8, 1.25, size=3),
            core_mm=0.55 * whole,
            necrosis_mm=max(0.0, min(0.25 * whole, 0.55 * whole - rim)),
            whole_mm=whole,
            mass=0.5 * primary.mass,
        )
        # Far enough from every focus that the labels do not touch; shrink if nothing fits.
        for attempt in range(200):
            if attempt and attempt % 50 == 0:
                satellite = _scaled(satellite, 0.8, rim)
            centre = _pick(rng, coarse, pool)
            reach = _reach_mm(satellite)
            if all(np.linalg.norm(centre - f.centre) > reach + _reach_mm(f) for f in foci):
                foci.append(dataclasses.replace(satellite, centre=centre))
                break
    return foci


def draw_lesion_sites(
    rng: np.random.Generator, coarse: Grid, anatomy: dict[str, np.ndarray], voxel: float
) -> list[tuple[np.ndarray, float, bool]]:
    """3-10 (centre, radius_mm, has_core) tuples, mostly periventricular, not touching."""
    brain = anatomy["brain"] > 0.5
    inside = _inside_distance(brain, COARSE_SPACING_MM)
    ventricles = (anatomy["csf"] > 0.5) & (inside >= 20)
    near_ventricle = _inside_distance(~ventricles, COARSE_SPACING_MM) <= 12
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


def lesion_maps(
    sites: list[tuple[np.ndarray, float, bool]],
    rng: np.random.Generator,
    grid: Grid,
    anatomy: dict[str, np.ndarray],
    fields: dict[str, Callable[[Grid], np.ndarray]],
    spacing: tuple[float, ...],
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Voxel fractions of each tissue, canonical label and soft lesion probability."""
    brain = anatomy["brain"]
    csf_rel = anatomy["csf"] / np.maximum(brain, 1e-6)
    shape_noise = fields["core"](grid)
    rater_mm = fields["rater_mm"] * fields["rater"](grid)
    width = 0.5 + 0.2 * min(spacing)
    lesion_p = np.zeros(grid.shape, np.float32)
    labelled = np.zeros(grid.shape, np.float32)
    core_p = np.zeros(grid.shape, np.float32)
    for centre, radius_mm, has_core in sites:
        rotation = rotation_matrix(rng.uniform(-np.pi, np.pi, size=3))
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
