"""MR contrast and scanner artefacts: tissue fractions -> four skull-stripped modalities."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from vi_seg_jax.data.conventions import MODALITIES
from vi_seg_jax.data.synthetic.fields import FieldSampler, Grid

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


def render(
    fractions: dict[str, np.ndarray],
    brain_mask: np.ndarray,
    grid: Grid,
    contrast_rng: np.random.Generator,
    scanner_rng: np.random.Generator,
    noise_rng: np.random.Generator,
    scanner_fields: FieldSampler,
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
