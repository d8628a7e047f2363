"""The shift-levels figure of docs/shift.md: one case under every kind and level of shift.

Regenerate docs/shift_levels.png (about 15 s on one CPU core) with

    python -m vi_seg_jax.data.synthetic.figure docs/shift_levels.png

Not imported by the package's `__init__`, so generating data never loads matplotlib.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from vi_seg_jax.data.synthetic.config import DEFAULT_SHAPE, SyntheticConfig
from vi_seg_jax.data.synthetic.generator import SyntheticCase, generate_case
from vi_seg_jax.data.synthetic.shift import (
    CONTRAST_LEVELS,
    LOCATIONS,
    MAX_SHIFT_LEVEL,
    SCANNER_LEVELS,
    SHIFT_KINDS,
    Shift,
    anatomy_mode,
)

# What each row shows: the modality in which that kind of shift is easiest to see.
ROW_MODALITY = {"scanner": "t1ce", "contrast": "t1ce", "anatomy": "flair"}


def _axial_slice(label: np.ndarray) -> int:
    """The axial index with the most tumour (the middle one when there is none)."""
    areas = (label > 0).reshape(-1, label.shape[-1]).sum(axis=0)
    return int(np.argmax(areas)) if areas.any() else label.shape[-1] // 2


def _level_note(kind: str, level: int, index: int) -> str:
    if kind == "scanner":
        s = SCANNER_LEVELS[level]
        return f"noise x{s.noise_factor:g}, slices {s.slice_mm:g} mm" if level else "none"
    if kind == "contrast":
        c = CONTRAST_LEVELS[level]
        return f"enh {c.enhancement:g}, lesion {c.lesion_contrast:g}" if level else "none"
    mode = anatomy_mode(index)
    if level == 0:
        return "none"
    return f"{mode}: {LOCATIONS[level]}" if mode == "location" else mode


def shift_levels_figure(
    path: str | Path,
    *,
    index: int = 2,
    seed: int = 0,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    cases: dict[tuple[str, int], SyntheticCase] | None = None,
) -> Path:
    """Writes a PNG grid: one row per shift kind, columns level 0-3, of case `index`.

    Each panel is an axial slice (the one with the most tumour; scanner and contrast rows share
    level 0's slice, since their labels do not change) of T1ce (scanner, contrast) or FLAIR
    (anatomy), scaled to its own 0.5-99.5th brain percentiles, with the whole-tumour outline
    in yellow and the enhancing tumour's in red.

    Args:
      path: PNG to write (its folder is created).
      index: the case; the anatomy row shows its mode (`anatomy_mode(index)`; the default
        case 2 is multifocal).
      seed: dataset seed.
      shape: output grid.
      cases: (kind, level) -> case, to draw already generated cases (tests); generated when
        missing.

    Returns:
      The written path.
    """
    cases = dict(cases or {})
    for kind in SHIFT_KINDS:
        for level in range(MAX_SHIFT_LEVEL + 1):
            if (kind, level) not in cases:
                config = SyntheticConfig(shape=shape, seed=seed, shift=Shift(kind, level))
                cases[(kind, level)] = generate_case(config, index)
    columns = MAX_SHIFT_LEVEL + 1
    figure, axes = plt.subplots(
        len(SHIFT_KINDS), columns, figsize=(2.6 * columns, 2.9 * len(SHIFT_KINDS)), squeeze=False
    )
    for row, kind in enumerate(SHIFT_KINDS):
        modality = ROW_MODALITY[kind]
        for level in range(columns):
            case = cases[(kind, level)]
            z = _axial_slice(case.label if kind == "anatomy" else cases[(kind, 0)].label)
            image = case.images[modality]
            lo, hi = np.percentile(image[case.brain_mask], [0.5, 99.5])
            axis = axes[row, level]
            axis.imshow(np.rot90(image[:, :, z]), cmap="gray", vmin=lo, vmax=hi)
            for mask, colour in ((case.label > 0, "yellow"), (case.label == 3, "red")):
                if mask[:, :, z].any():
                    axis.contour(
                        np.rot90(mask[:, :, z].astype(np.float32)),
                        levels=[0.5],
                        colors=colour,
                        linewidths=0.8,
                    )
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_title(f"{kind}:{level} (z={z})\n{_level_note(kind, level, index)}", fontsize=8)
            if level == 0:
                axis.set_ylabel(f"{kind}\n{modality.upper()}", fontsize=9)
    figure.suptitle(f"synthetic case {index} (seed {seed}), shift levels 0-{MAX_SHIFT_LEVEL}")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


if __name__ == "__main__":
    print(shift_levels_figure(sys.argv[1] if len(sys.argv) > 1 else "docs/shift_levels.png"))
