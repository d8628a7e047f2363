"""Figures a person would rather look at than read (matplotlib, written to PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def tumour_slice(mask: np.ndarray) -> int:
    """Axial index with the most foreground (the middle slice when there is none)."""
    areas = np.asarray(mask).reshape(-1, mask.shape[-1]).sum(axis=0)
    return int(np.argmax(areas)) if areas.any() else mask.shape[-1] // 2


def uncertainty_figure(
    path: str | Path,
    *,
    image: np.ndarray,
    truth: np.ndarray | None,
    prediction: np.ndarray,
    aleatoric: np.ndarray,
    epistemic: np.ndarray,
    title: str = "",
) -> Path:
    """The paper's figure layout: input, ground truth, prediction, aleatoric, epistemic.

    Args:
      path: PNG to write.
      image: [X, Y, Z] one modality.
      truth: [X, Y, Z] bool whole-tumour mask, or None.
      prediction: [X, Y, Z] bool.
      aleatoric, epistemic: [X, Y, Z] foreground variances.
      title: figure title.
    """
    z = tumour_slice(truth if truth is not None else prediction)
    panels = [
        ("input", image, "gray"),
        ("ground truth", truth, "gray"),
        ("prediction", prediction, "gray"),
    ]
    panels += [("aleatoric", aleatoric, "magma"), ("epistemic", epistemic, "magma")]
    figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for axis, (name, volume, cmap) in zip(axes, panels, strict=True):
        axis.set_axis_off()
        axis.set_title(name)
        if volume is None:
            axis.text(0.5, 0.5, "not available", ha="center", va="center", transform=axis.transAxes)
            continue
        shown = axis.imshow(np.rot90(np.asarray(volume, np.float32)[:, :, z]), cmap=cmap)
        if cmap == "magma":
            figure.colorbar(shown, ax=axis, fraction=0.046, pad=0.04)
    figure.suptitle(f"{title} (axial slice {z})" if title else f"axial slice {z}")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
