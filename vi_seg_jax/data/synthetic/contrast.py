"""MR contrast and scanner artefacts: tissue fractions -> four skull-stripped modalities.

`render` optionally applies a scanner shift (noise, bias, slice thickness, intensity response,
gain) and a contrast shift (enhancement and lesion contrast); see `shift.py`. Without them, or
at level 0, it is bitwise the unshifted renderer: the shift only rescales the same draws and
takes its own draws from `shift_rng`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from vi_seg_jax.data.conventions import MODALITIES
from vi_seg_jax.data.synthetic.fields import FieldSampler, Grid
from vi_seg_jax.data.synthetic.shift import ContrastShift, ScannerShift

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
# T1ce of enhancing tumour without contrast agent: its T1 mean plus the T1ce rows' usual +0.02.
_UNENHANCED_T1CE = 0.68
# Abnormal tissues whose FLAIR and T2 contrast against white matter a contrast shift lowers.
_LESION_TISSUES = ("edema", "necrosis", "non_enhancing", "enhancing", "lesion", "lesion_core")
_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


def shifted_means(contrast: ContrastShift) -> dict[str, tuple[float, ...]]:
    """The per-tissue mean table (`_MEANS`) after a contrast shift.

    T1ce enhancement keeps `contrast.enhancement` of its excess over the unenhanced value
    (0.68); FLAIR and T2 of abnormal tissue keep `contrast.lesion_contrast` of their difference
    from white matter. T1 is unchanged.
    """
    means = {modality: list(values) for modality, values in _MEANS.items()}
    enhancing = _TISSUES.index("enhancing")
    excess = means["t1ce"][enhancing] - _UNENHANCED_T1CE
    means["t1ce"][enhancing] = _UNENHANCED_T1CE + contrast.enhancement * excess
    for modality in ("t2", "flair"):
        wm = means[modality][_TISSUES.index("wm")]
        for tissue in _LESION_TISSUES:
            i = _TISSUES.index(tissue)
            means[modality][i] = wm + contrast.lesion_contrast * (means[modality][i] - wm)
    return {modality: tuple(values) for modality, values in means.items()}


def _sample_along_z(volume: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Linear interpolation of `volume` [X, Y, Z] at fractional z indices (clamped at the ends)."""
    positions = np.clip(positions, 0, volume.shape[2] - 1)
    lo = np.floor(positions).astype(np.int64)
    hi = np.minimum(lo + 1, volume.shape[2] - 1)
    t = (positions - lo).astype(np.float32)
    return volume[..., lo] * (1 - t) + volume[..., hi] * t


def thick_slices(
    volume: np.ndarray, spacing_z: float, thickness_mm: float, offset: float
) -> np.ndarray:
    """What a 2D acquisition with `thickness_mm` slices, resampled onto the grid, would show.

    A Gaussian slice profile of FWHM `thickness_mm` along z, sampled at slice centres every
    `thickness_mm` (the first at `offset` in [0, 1) of a slice step), then linearly
    interpolated back onto the grid's z positions.

    Args:
      volume: [X, Y, Z] float32.
      spacing_z: the grid's z spacing in mm.
      thickness_mm: slice thickness in mm (> 0).
      offset: slice-position phase in [0, 1).

    Returns:
      [X, Y, Z] float32.
    """
    sigma = thickness_mm / _FWHM_PER_SIGMA / spacing_z
    blurred = ndimage.gaussian_filter1d(volume, sigma, axis=2, mode="nearest")
    step = thickness_mm / spacing_z  # voxels between slice centres
    centres = np.arange((offset - 1) * step, volume.shape[2] - 1 + step, step)
    stack = _sample_along_z(blurred, centres)
    return _sample_along_z(stack, (np.arange(volume.shape[2]) - centres[0]) / step).astype(
        np.float32
    )


def render(
    fractions: dict[str, np.ndarray],
    brain_mask: np.ndarray,
    grid: Grid,
    contrast_rng: np.random.Generator,
    scanner_rng: np.random.Generator,
    noise_rng: np.random.Generator,
    scanner_fields: FieldSampler,
    texture: np.ndarray,
    *,
    scanner: ScannerShift | None = None,
    contrast: ContrastShift | None = None,
    shift_rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """Tissue fractions -> four scanner-like modalities ([X, Y, Z] float32 each).

    Args:
      fractions: tissue name -> [X, Y, Z] float32 voxel fraction.
      brain_mask: [X, Y, Z] bool; images are 0 outside it.
      grid: the output grid.
      contrast_rng, scanner_rng, noise_rng: the case's contrast, scanner and noise streams.
      scanner_fields: draws the bias fields (from the scanner stream).
      texture: [X, Y, Z] smooth unit-variance field, a 4% multiplicative tissue texture.
      scanner: a scanner shift, or None.
      contrast: a contrast shift, or None.
      shift_rng: the shift's own stream; needed with `scanner`.
    """
    table = _MEANS if contrast is None else shifted_means(contrast)
    if scanner is not None:
        # Drawn up front, in a fixed order, so every level uses the same signs and phase.
        signs = np.where(shift_rng.uniform(size=(len(MODALITIES), 2)) < 0.5, -1.0, 1.0)
        slice_offset = float(shift_rng.uniform())
    images = {}
    for m, modality in enumerate(MODALITIES):
        means = np.asarray(table[modality]) * np.exp(contrast_rng.normal(0, 0.04, len(_TISSUES)))
        clean = np.zeros(grid.shape, np.float32)
        for tissue, mean in zip(_TISSUES, means, strict=True):
            if tissue in fractions:
                clean += np.float32(mean) * fractions[tissue]
        clean *= 1.0 + 0.04 * texture
        clean = ndimage.gaussian_filter(clean, sigma=0.5, mode="constant")  # partial volume
        gain = np.exp(scanner_rng.uniform(np.log(300.0), np.log(3000.0)))
        amplitude = scanner_rng.uniform(0.03, 0.12)
        if scanner is not None:
            if scanner.slice_mm > 0:
                clean = thick_slices(clean, grid.spacing[2], scanner.slice_mm, slice_offset)
            gamma = np.float32(np.exp(signs[m, 0] * scanner.gamma_log))
            clean = np.power(np.maximum(clean, 0), gamma, dtype=np.float32)
            gain *= scanner.gain_factor ** signs[m, 1]
            amplitude *= scanner.bias_factor
        bias = np.exp(amplitude * scanner_fields.draw(90.0)(grid))
        signal = gain * bias * clean
        sigma = scanner_rng.uniform(0.015, 0.045) * gain
        if scanner is not None:
            sigma *= scanner.noise_factor
        real = signal + sigma * noise_rng.standard_normal(grid.shape, dtype=np.float32)
        imaginary = sigma * noise_rng.standard_normal(grid.shape, dtype=np.float32)
        images[modality] = (np.hypot(real, imaginary) * brain_mask).astype(np.float32)
    return images
