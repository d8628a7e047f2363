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

Uncertainty against errors (does the uncertainty point at the misclassified voxels?). The error
mask is ``prediction != truth`` inside ``mask`` (the brain). Every function here takes one
region's arrays (e.g. the whole-tumour masks and an uncertainty map for that region), so the
BraTS regions (WT, TC, ET) are scored one at a time by calling it once per region.

- Error-detection AUROC: the uncertainty as a score separating erroneous from correct voxels,
  AUROC = P(u_err > u_ok) + ½ P(u_err = u_ok), i.e. the Mann–Whitney U statistic over
  n_err · n_ok (Hanley & McNeil 1982, "The meaning and use of the area under a receiver
  operating characteristic (ROC) curve", Radiology 143). Ties count ½, exactly as average
  ranks do. NaN when there are no errors or no correct voxels (the AUROC is undefined).
- Uncertainty–error overlap, UEO (Jungo & Reyes 2019, "Assessing reliability and challenges of
  uncertainty estimations for medical image segmentation", MICCAI 2019): the Dice between the
  error mask and the binarised uncertainty ``uncertainty > t``, both restricted to ``mask``;
  no errors and nothing uncertain is a perfect match (1.0, the ``dice`` convention and the
  paper's code's). The paper normalises the uncertainty to [0, 1] (entropy / log C), scores
  t ∈ ``UEO_THRESHOLDS`` (0.05, 0.1, 0.2, ..., 0.9, 0.95) and reports, per method, the mean
  UEO over cases at the one threshold that maximises that mean
  (``best_uncertainty_error_overlap`` on the stacked per-case curves).
- Case-level failure detection: ``spearman_correlation`` of a per-case score (e.g.
  ``mean_uncertainty`` in the brain) against the case's Dice; a good uncertainty gives a
  strongly negative ρ.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
from scipy import ndimage, stats

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


# --- Uncertainty against errors ----------------------------------------------------------------

# Jungo & Reyes (2019)'s threshold grid for an uncertainty normalised to [0, 1].
UEO_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def _masked_uncertainty_and_error(
    uncertainty: np.ndarray,
    prediction: np.ndarray,
    truth: np.ndarray,
    mask: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(uncertainty as float64, error = prediction != truth) of the voxels in mask, 1-D."""
    uncertainty = np.asarray(uncertainty)
    prediction = np.asarray(prediction)
    truth = np.asarray(truth)
    arrays = {"prediction": prediction, "truth": truth}
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        arrays["mask"] = mask
    for name, array in arrays.items():
        if array.shape != uncertainty.shape:
            raise ValueError(
                f"{name} shape {array.shape} differs from uncertainty {uncertainty.shape}"
            )
    error = prediction != truth
    if mask is not None:
        uncertainty, error = uncertainty[mask], error[mask]
    uncertainty = uncertainty.astype(np.float64).ravel()
    if not np.all(np.isfinite(uncertainty)):
        raise ValueError("uncertainty must be finite")
    return uncertainty, error.ravel()


def error_detection_auroc(
    uncertainty: np.ndarray,
    prediction: np.ndarray,
    truth: np.ndarray,
    mask: np.ndarray | None = None,
) -> float:
    """AUROC of the uncertainty as a detector of the misclassified voxels of one region.

    AUROC = U / (n_err · n_ok) with the Mann–Whitney U = Σ_{err i, ok j} [u_i > u_j] + ½ [u_i
    = u_j] (Hanley & McNeil 1982), the same value as the average-rank formula and as sklearn's
    ``roc_auc_score(error, uncertainty)``. O(n log n): the correct voxels' uncertainties are
    sorted once and each error's count of smaller and equal ones found by binary search; the
    counts are summed as integers, so the result is exact up to the final division.

    Args:
      uncertainty: [...] finite uncertainty, higher meaning less sure.
      prediction, truth: same shape, one region's boolean masks (error = prediction != truth).
      mask: same shape, boolean voxels to score (the brain); None is the whole volume.

    Returns:
      The AUROC in [0, 1] (1: every error more uncertain than every correct voxel, 0.5:
      chance); NaN when the selection holds no errors or no correct voxels.
    """
    uncertainty, error = _masked_uncertainty_and_error(uncertainty, prediction, truth, mask)
    errors, correct = uncertainty[error], np.sort(uncertainty[~error])
    if errors.size == 0 or correct.size == 0:
        return float("nan")
    # 2U = Σ_err (#ok below + #ok at or below) = Σ_err (2 · #below + #equal).
    below = np.searchsorted(correct, errors, side="left")
    at_or_below = np.searchsorted(correct, errors, side="right")
    twice_u = int(np.sum(below, dtype=np.int64)) + int(np.sum(at_or_below, dtype=np.int64))
    return twice_u / (2.0 * errors.size * correct.size)


def uncertainty_error_overlap_curve(
    uncertainty: np.ndarray,
    prediction: np.ndarray,
    truth: np.ndarray,
    thresholds: np.ndarray | tuple[float, ...] = UEO_THRESHOLDS,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """UEO (Jungo & Reyes 2019) of one region at each threshold: [T] Dice(error, u > t).

    One sort of the uncertainties, then a binary search per threshold, instead of a pass per
    threshold. Arguments as in ``uncertainty_error_overlap``; ``thresholds``: [T] values of t
    in the uncertainty's units (the default grid assumes it is normalised to [0, 1]).
    """
    uncertainty, error = _masked_uncertainty_and_error(uncertainty, prediction, truth, mask)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.ndim != 1:
        raise ValueError(f"thresholds must be 1-D, got shape {thresholds.shape}")
    # Uncertain at t means u > t: the count of values above t is n − #(u ≤ t).
    uncertain = uncertainty.size - np.searchsorted(np.sort(uncertainty), thresholds, "right")
    overlap = error.sum() - np.searchsorted(np.sort(uncertainty[error]), thresholds, "right")
    denominator = int(error.sum()) + uncertain
    return np.divide(
        2.0 * overlap, denominator, out=np.ones(thresholds.shape), where=denominator > 0
    )


def uncertainty_error_overlap(
    uncertainty: np.ndarray,
    prediction: np.ndarray,
    truth: np.ndarray,
    threshold: float,
    mask: np.ndarray | None = None,
) -> float:
    """UEO (Jungo & Reyes 2019): Dice of the error mask and ``uncertainty > threshold``.

    Args:
      uncertainty: [...] finite uncertainty (the paper normalises it to [0, 1]).
      prediction, truth: same shape, one region's boolean masks (error = prediction != truth).
      threshold: t, in the uncertainty's units; voxels with u > t are "uncertain".
      mask: same shape, boolean voxels to score (the brain); None is the whole volume.

    Returns:
      2 |E ∩ U_t| / (|E| + |U_t|) in [0, 1]; 1.0 when there are no errors and nothing is
      uncertain.
    """
    curve = uncertainty_error_overlap_curve(uncertainty, prediction, truth, (threshold,), mask)
    return float(curve[0])


class BestUEO(NamedTuple):
    """The threshold maximising the (mean) UEO and that UEO."""

    threshold: float
    ueo: float


def best_uncertainty_error_overlap(
    curves: np.ndarray, thresholds: np.ndarray | tuple[float, ...] = UEO_THRESHOLDS
) -> BestUEO:
    """Maximum of UEO curves over the threshold grid.

    Args:
      curves: [T] one case's ``uncertainty_error_overlap_curve`` (its best threshold), or
        [N, T] the curves of N cases: then the threshold maximising the mean over cases, and
        that mean, as Jungo & Reyes (2019) report UEO per method.
      thresholds: [T] the grid the curves were computed on.

    Returns:
      BestUEO(threshold, ueo); on a tie the first maximum in grid order.
    """
    curves = np.asarray(curves, dtype=np.float64)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.ndim != 1 or curves.ndim not in (1, 2) or curves.shape[-1] != thresholds.size:
        raise ValueError(
            f"curves shape {curves.shape} must be [T] or [N, T] with T = {thresholds.size} "
            "thresholds"
        )
    if curves.ndim == 2 and curves.shape[0] == 0:
        raise ValueError("no curves given")
    mean = curves if curves.ndim == 1 else curves.mean(axis=0)
    best = int(np.argmax(mean))
    return BestUEO(float(thresholds[best]), float(mean[best]))


def mean_uncertainty(uncertainty: np.ndarray, mask: np.ndarray | None) -> float:
    """Mean uncertainty over the voxels in mask (e.g. the brain), a case-level score.

    Float64 accumulation. None is the whole volume; an empty mask gives NaN.
    """
    uncertainty = np.asarray(uncertainty)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != uncertainty.shape:
            raise ValueError(
                f"mask shape {mask.shape} differs from uncertainty {uncertainty.shape}"
            )
        uncertainty = uncertainty[mask]
    if uncertainty.size == 0:
        return float("nan")
    return float(np.mean(uncertainty, dtype=np.float64))


def spearman_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's ρ: the Pearson correlation of the average ranks of x and y (ties averaged).

    For case-level failure detection, e.g. x the cases' mean uncertainty and y their Dice
    (a useful uncertainty gives ρ near −1). Equal to ``scipy.stats.spearmanr(x, y)``'s
    statistic.

    Args:
      x, y: [N] finite values of the same N cases.

    Returns:
      ρ in [−1, 1]; NaN when N < 2 or either input is constant (ρ is undefined).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"x and y must be 1-D of one length, got {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("x and y must be finite")
    if x.size < 2:
        return float("nan")
    rank_x = stats.rankdata(x) - (x.size + 1) / 2.0  # centred: average ranks sum to n(n+1)/2
    rank_y = stats.rankdata(y) - (y.size + 1) / 2.0
    norm = np.sqrt(np.sum(rank_x**2) * np.sum(rank_y**2))
    if norm == 0.0:
        return float("nan")
    return float(np.clip(np.sum(rank_x * rank_y) / norm, -1.0, 1.0))
