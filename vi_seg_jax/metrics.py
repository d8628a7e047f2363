"""Segmentation metrics (method.md §7), NumPy, per volume.

The paper's Dice and IoU are of the foreground of one volume, from the confusion counts,
background excluded: Dice = 2TP / (2TP + FP + FN), IoU = TP / (TP + FP + FN) = D / (2 − D).
Empty truth and empty prediction count as a perfect match (Dice 1), an empty prediction
against a non-empty truth as Dice 0 (the BraTS convention).
"""

from __future__ import annotations

import numpy as np


def confusion(prediction: np.ndarray, truth: np.ndarray) -> tuple[int, int, int]:
    """(TP, FP, FN) of two boolean masks."""
    prediction = np.asarray(prediction, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from truth {truth.shape}")
    tp = int(np.count_nonzero(prediction & truth))
    return (
        tp,
        int(np.count_nonzero(prediction & ~truth)),
        int(np.count_nonzero(~prediction & truth)),
    )


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    tp, fp, fn = confusion(prediction, truth)
    return 1.0 if tp + fp + fn == 0 else 2.0 * tp / (2.0 * tp + fp + fn)


def iou(prediction: np.ndarray, truth: np.ndarray) -> float:
    tp, fp, fn = confusion(prediction, truth)
    return 1.0 if tp + fp + fn == 0 else tp / (tp + fp + fn)
