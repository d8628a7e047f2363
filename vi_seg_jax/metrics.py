"""Segmentation metrics (method.md §7), NumPy, per volume.

The paper's Dice and IoU are of the foreground of one volume, from the confusion counts,
background excluded: Dice = 2TP / (2TP + FP + FN), IoU = TP / (TP + FP + FN) = D / (2 − D).
Empty truth and empty prediction count as a perfect match (Dice 1), an empty prediction
against a non-empty truth as Dice 0 (the BraTS convention).

HD95 (MedPy's ``hd95``): the surface of a mask is its voxels with at least one face neighbour
(``generate_binary_structure(ndim, 1)``) outside the mask or outside the array; the distances
from every surface voxel of one mask to the nearest surface voxel of the other, in mm
(``distance_transform_edt`` with ``sampling=spacing``), are pooled over both directions and
their 95th percentile taken. Both masks empty gives 0.0, exactly one empty gives ``cap``
(``HD95_CAP`` = 373.13 mm, the diagonal of the 240×240×155 1 mm BraTS grid, as the BraTS
evaluations use); the cap is only that convention, computed distances are not clipped.

Calibration treats a region as a binary problem and uses the probability p of the positive
class (reliability-diagram style), not the max-class confidence max(p, 1 − p). Voxels are
restricted to an optional boolean ``mask`` (the brain). Bins are equal-width on [0, 1],
bin b = [b/B, (b+1)/B) with the last bin closed so that p = 1 falls in it. Empty bins have
NaN confidence and accuracy and weigh nothing in the ECE. An empty selection is an error.

QU-BraTS 2020 (one region), as the challenge's official scorer computes it: thresholds
τ = linspace(100, 0, num_thresholds), by default 41 of them, 100, 97.5, ..., 2.5, 0 (step 2.5).
That is the official grid: the scorer's ``num_points`` = 40 counts steps, not points, and its
``arange(0, 100 + eps, 100 / 40)`` with a float32 eps drops the 100 under NumPy 2 (the sum
rounds to 100 in float32), leaving 40 points from 97.5; the 41 points are its grid under
NumPy 1.x, the NumPy of the 2020 challenge. At τ the voxels with uncertainty > τ are filtered
out (so τ = 100 filters nothing, and u = τ is kept). On the kept voxels: Dice (the ``dice``
convention, nothing left on either side gives 1), FTP = (TP_all − TP_kept) / TP_all and
FTN = (TN_all − TN_kept) / TN_all, true positives and true negatives both counted only inside
``mask`` (the brain); the mask does not restrict Dice. A zero denominator gives a ratio of 0
at every τ; the official scorer divides by count + float32 eps instead, which gives 0 there
too and otherwise differs by at most about 1e-7 relative. AUCs are trapezoids over
x = τ / 100 from 0 to 1, and the score is (AUC_Dice + (1 − AUC_FTP) + (1 − AUC_FTN)) / 3.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
from scipy import ndimage

HD95_CAP = 373.13
# Voxels per chunk when streaming a volume through the calibration sums: bounds temporaries.
_CHUNK = 1 << 20


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


# --- HD95 --------------------------------------------------------------------------------------


def surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a boolean mask: mask & ~erosion(mask), face connectivity.

    The erosion's border value is 0, so mask voxels on the edge of the array are surface.
    """
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _surface_distances(
    source: np.ndarray, target: np.ndarray, spacing: tuple[float, ...]
) -> np.ndarray:
    """Distance (mm) from each source voxel to the nearest target voxel."""
    # The EDT measures the distance to the nearest zero, so the target voxels are the zeros.
    return ndimage.distance_transform_edt(~target, sampling=spacing)[source]


def hd95(
    prediction: np.ndarray,
    truth: np.ndarray,
    spacing: tuple[float, ...] = (1.0, 1.0, 1.0),
    cap: float = HD95_CAP,
) -> float:
    """95th percentile of the pooled symmetric surface-to-surface distances, in mm (MedPy).

    hd95 = percentile(hstack([d(∂A → ∂B), d(∂B → ∂A)]), 95). Both masks empty gives 0.0,
    exactly one empty gives ``cap``. 2D masks take a 2-element spacing.
    """
    prediction = np.asarray(prediction, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from truth {truth.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != prediction.ndim or min(spacing) <= 0:
        raise ValueError(f"spacing {spacing} must be {prediction.ndim} positive numbers")
    has_prediction, has_truth = bool(prediction.any()), bool(truth.any())
    if not (has_prediction or has_truth):
        return 0.0
    if has_prediction != has_truth:
        return float(cap)
    surface_prediction, surface_truth = surface(prediction), surface(truth)
    distances = np.hstack(
        [
            _surface_distances(surface_prediction, surface_truth, spacing),
            _surface_distances(surface_truth, surface_prediction, spacing),
        ]
    )
    return float(np.percentile(distances, 95))


# --- Calibration -------------------------------------------------------------------------------


class CalibrationBins(NamedTuple):
    """Reliability-diagram bins of the positive-class probability.

    edges: [B + 1] bin edges on [0, 1]; counts: [B] voxels per bin; confidence: [B] mean p;
    accuracy: [B] fraction of positive truth. Empty bins have NaN confidence and accuracy.
    """

    edges: np.ndarray
    counts: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray


def _selected_chunks(
    p: np.ndarray, truth: np.ndarray, mask: np.ndarray | None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(p as float64, truth as bool) of the voxels in mask, a bounded chunk at a time."""
    p = np.asarray(p)
    truth = np.asarray(truth, dtype=bool)
    if p.shape != truth.shape:
        raise ValueError(f"probability shape {p.shape} differs from truth {truth.shape}")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != p.shape:
            raise ValueError(f"mask shape {mask.shape} differs from probability {p.shape}")
        mask = mask.ravel()
    p, truth = p.ravel(), truth.ravel()
    # Chunks keep the float64 copies and per-voxel temporaries small on 10^7-voxel volumes.
    for start in range(0, p.size, _CHUNK):
        chunk_p = p[start : start + _CHUNK].astype(np.float64)
        chunk_truth = truth[start : start + _CHUNK]
        if mask is not None:
            keep = mask[start : start + _CHUNK]
            chunk_p, chunk_truth = chunk_p[keep], chunk_truth[keep]
        if not np.all((chunk_p >= 0.0) & (chunk_p <= 1.0)):
            raise ValueError("probabilities must be finite and in [0, 1]")
        yield chunk_p, chunk_truth


def calibration_bins(
    p: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None, num_bins: int = 15
) -> CalibrationBins:
    """Counts, mean confidence and accuracy in equal-width bins of p over the masked voxels.

    Bin b holds b/B ≤ p < (b+1)/B, the last bin also p = 1.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be positive, got {num_bins}")
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    counts = np.zeros(num_bins, np.int64)
    sum_p = np.zeros(num_bins)
    sum_truth = np.zeros(num_bins)
    for chunk_p, chunk_truth in _selected_chunks(p, truth, mask):
        index = np.minimum(np.searchsorted(edges, chunk_p, side="right") - 1, num_bins - 1)
        counts += np.bincount(index, minlength=num_bins)
        sum_p += np.bincount(index, weights=chunk_p, minlength=num_bins)
        sum_truth += np.bincount(index, weights=chunk_truth, minlength=num_bins)
    if counts.sum() == 0:
        raise ValueError("no voxels selected")
    nonempty = counts > 0
    confidence = np.divide(sum_p, counts, out=np.full(num_bins, np.nan), where=nonempty)
    accuracy = np.divide(sum_truth, counts, out=np.full(num_bins, np.nan), where=nonempty)
    return CalibrationBins(edges, counts, confidence, accuracy)


def bins_ece(bins: CalibrationBins) -> float:
    """ECE of reliability bins: Σ_b (n_b / N) |acc_b − conf_b| over the non-empty bins."""
    nonempty = bins.counts > 0
    gaps = np.abs(bins.accuracy[nonempty] - bins.confidence[nonempty])
    return float(np.sum(bins.counts[nonempty] * gaps) / bins.counts.sum())


def expected_calibration_error(
    p: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None, num_bins: int = 15
) -> float:
    """ECE = Σ_b (n_b / N) |acc_b − conf_b| over equal-width bins of p (positive class)."""
    return bins_ece(calibration_bins(p, truth, mask, num_bins))


def brier_score(p: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Brier score: mean over the masked voxels of (p − y)², y ∈ {0, 1}."""
    total, count = 0.0, 0
    for chunk_p, chunk_truth in _selected_chunks(p, truth, mask):
        total += float(np.sum((chunk_p - chunk_truth) ** 2))
        count += chunk_p.size
    if count == 0:
        raise ValueError("no voxels selected")
    return total / count


def negative_log_likelihood(
    p: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None, eps: float = 1e-7
) -> float:
    """Mean over the masked voxels of −[y log p + (1 − y) log(1 − p)].

    p is clipped to [ε, 1 − ε] first, so a certain wrong voxel costs −log ε, not infinity.
    """
    total, count = 0.0, 0
    for chunk_p, chunk_truth in _selected_chunks(p, truth, mask):
        chunk_p = np.clip(chunk_p, eps, 1.0 - eps)
        # y is 0 or 1, so only one of the two log terms is non-zero per voxel.
        total -= float(np.sum(np.log(np.where(chunk_truth, chunk_p, 1.0 - chunk_p))))
        count += chunk_p.size
    if count == 0:
        raise ValueError("no voxels selected")
    return total / count


# --- QU-BraTS ----------------------------------------------------------------------------------


class QUBraTS(NamedTuple):
    """QU-BraTS 2020 filtering curves of one region and their summary.

    thresholds: [T] τ from 100 down to 0; dice, ftp, ftn: [T] curves at each τ;
    dice_auc, ftp_auc, ftn_auc: trapezoid areas over τ / 100 ∈ [0, 1];
    score = (dice_auc + (1 − ftp_auc) + (1 − ftn_auc)) / 3.
    """

    thresholds: np.ndarray
    dice: np.ndarray
    ftp: np.ndarray
    ftn: np.ndarray
    dice_auc: float
    ftp_auc: float
    ftn_auc: float
    score: float


def _kept_counts(uncertainty: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Number of uncertainty values ≤ τ for each τ (the voxels a threshold keeps)."""
    # One sort, then a binary search per threshold, instead of a full pass per threshold.
    return np.searchsorted(np.sort(uncertainty), thresholds, side="right")


def _filtered_ratio(kept: np.ndarray, total: int) -> np.ndarray:
    """(total − kept) / total at each τ; 0 everywhere when total is 0 (nothing to filter)."""
    if total == 0:
        return np.zeros(kept.shape)
    return (total - kept) / total


def _threshold_auc(thresholds: np.ndarray, curve: np.ndarray) -> float:
    """Trapezoid area of a curve over x = τ / 100, integrated from 0 to 1."""
    order = np.argsort(thresholds)
    return float(np.trapezoid(curve[order], thresholds[order] / 100.0))


def qubrats(
    prediction: np.ndarray,
    truth: np.ndarray,
    uncertainty: np.ndarray,
    mask: np.ndarray | None = None,
    num_thresholds: int = 41,
) -> QUBraTS:
    """QU-BraTS 2020 uncertainty score of one region (definitions in the module docstring).

    Args:
      prediction, truth: boolean masks of the region.
      uncertainty: same shape, values in [0, 100].
      mask: boolean brain mask within which true positives and true negatives count for FTP
        and FTN; None is the whole volume.
      num_thresholds: τ = linspace(100, 0, num_thresholds); the default 41 is the official
        grid (its ``num_points`` = 40 steps of 2.5).
    """
    prediction = np.asarray(prediction, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    uncertainty = np.asarray(uncertainty, dtype=np.float64)
    mask = np.ones(truth.shape, bool) if mask is None else np.asarray(mask, dtype=bool)
    for name, array in (("truth", truth), ("uncertainty", uncertainty), ("mask", mask)):
        if array.shape != prediction.shape:
            raise ValueError(
                f"{name} shape {array.shape} differs from prediction {prediction.shape}"
            )
    if not np.all((uncertainty >= 0.0) & (uncertainty <= 100.0)):
        raise ValueError("uncertainty must be finite and in [0, 100]")
    if num_thresholds < 2:
        raise ValueError(f"num_thresholds must be at least 2, got {num_thresholds}")
    thresholds = np.linspace(100.0, 0.0, num_thresholds)
    true_positive = prediction & truth
    true_positive_in_mask = true_positive & mask
    true_negative = ~prediction & ~truth & mask
    tp = _kept_counts(uncertainty[true_positive], thresholds)
    fp = _kept_counts(uncertainty[prediction & ~truth], thresholds)
    fn = _kept_counts(uncertainty[~prediction & truth], thresholds)
    tn = _kept_counts(uncertainty[true_negative], thresholds)
    denominator = 2 * tp + fp + fn
    dice_curve = np.divide(
        2.0 * tp, denominator, out=np.ones(num_thresholds), where=denominator > 0
    )
    ftp = _filtered_ratio(
        _kept_counts(uncertainty[true_positive_in_mask], thresholds),
        int(np.count_nonzero(true_positive_in_mask)),
    )
    ftn = _filtered_ratio(tn, int(np.count_nonzero(true_negative)))
    dice_auc = _threshold_auc(thresholds, dice_curve)
    ftp_auc = _threshold_auc(thresholds, ftp)
    ftn_auc = _threshold_auc(thresholds, ftn)
    score = (dice_auc + (1.0 - ftp_auc) + (1.0 - ftn_auc)) / 3.0
    return QUBraTS(thresholds, dice_curve, ftp, ftn, dice_auc, ftp_auc, ftn_auc, score)
