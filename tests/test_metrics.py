import math

import numpy as np
import pytest
from scipy import ndimage, stats
from scipy.spatial.distance import cdist

from vi_seg_jax import metrics
from vi_seg_jax.metrics import (
    HD95_CAP,
    UEO_THRESHOLDS,
    best_uncertainty_error_overlap,
    brier_score,
    calibration_bins,
    dice,
    error_detection_auroc,
    expected_calibration_error,
    hd95,
    iou,
    mean_uncertainty,
    negative_log_likelihood,
    qubrats,
    spearman_correlation,
    surface,
    uncertainty_error_overlap,
    uncertainty_error_overlap_curve,
)


def test_dice_and_iou_match_set_formulas_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.random((6, 7, 5)) > rng.random()
        b = rng.random((6, 7, 5)) > rng.random()
        pa, pb = set(zip(*np.nonzero(a), strict=True)), set(zip(*np.nonzero(b), strict=True))
        if not pa and not pb:
            continue
        assert dice(a, b) == pytest.approx(2 * len(pa & pb) / (len(pa) + len(pb)))
        assert iou(a, b) == pytest.approx(len(pa & pb) / len(pa | pb))
        d = dice(a, b)
        assert iou(a, b) == pytest.approx(d / (2 - d))


def test_empty_conventions():
    empty = np.zeros((3, 3), bool)
    full = np.ones((3, 3), bool)
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
    assert dice(empty, full) == 0.0 and iou(empty, full) == 0.0
    with pytest.raises(ValueError, match="differs from truth"):
        dice(empty, np.zeros((2, 3), bool))


# --- HD95 --------------------------------------------------------------------------------------


def _reference_surface(mask):
    """Voxels of mask with a face neighbour outside the mask or the array, by explicit shifts."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    all_neighbours_inside = np.ones(mask.shape, bool)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            all_neighbours_inside &= np.roll(padded, step, axis=axis)[inner]
    return mask & ~all_neighbours_inside


def _reference_hd95(a, b, spacing):
    """MedPy's hd95 by brute force: all pairwise distances between the two surfaces."""
    points_a = np.argwhere(_reference_surface(a)) * np.asarray(spacing)
    points_b = np.argwhere(_reference_surface(b)) * np.asarray(spacing)
    pairwise = cdist(points_a, points_b)
    return np.percentile(np.hstack([pairwise.min(axis=1), pairwise.min(axis=0)]), 95)


def test_surface_is_mask_minus_face_erosion():
    cube = np.zeros((5, 5, 5), bool)
    cube[1:4, 1:4, 1:4] = True
    expected = cube.copy()
    expected[2, 2, 2] = False
    assert np.array_equal(surface(cube), expected)
    # On the array edge every mask voxel is surface.
    assert surface(np.ones((3, 3), bool)).sum() == 8


def test_hd95_matches_brute_force_on_random_3d_masks_with_anisotropic_spacing():
    rng = np.random.default_rng(1)
    spacing = (1.0, 0.7, 2.5)
    for _ in range(15):
        a = ndimage.binary_dilation(rng.random((9, 8, 7)) > 0.9)
        b = ndimage.binary_dilation(rng.random((9, 8, 7)) > 0.9)
        if not (a.any() and b.any()):
            continue
        assert hd95(a, b, spacing) == pytest.approx(_reference_hd95(a, b, spacing))
        assert hd95(a, b, spacing) == pytest.approx(hd95(b, a, spacing))


def test_hd95_matches_brute_force_in_2d():
    rng = np.random.default_rng(2)
    a, b = rng.random((12, 10)) > 0.7, rng.random((12, 10)) > 0.6
    assert hd95(a, b, (0.5, 1.5)) == pytest.approx(_reference_hd95(a, b, (0.5, 1.5)))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_hd95_of_plates_shifted_by_k_voxels_is_k_times_spacing(k):
    # Every voxel of a one-voxel-thick plate is at distance exactly k·s_x from the other plate.
    spacing = (1.3, 0.8, 2.0)
    a = np.zeros((10, 6, 5), bool)
    b = np.zeros_like(a)
    a[2], b[2 + k] = True, True
    assert hd95(a, b, spacing) == pytest.approx(k * spacing[0])


def test_hd95_of_identical_masks_is_zero_and_empty_conventions():
    rng = np.random.default_rng(3)
    a = rng.random((6, 6, 6)) > 0.5
    empty = np.zeros_like(a)
    assert hd95(a, a) == 0.0
    assert hd95(empty, empty) == 0.0
    assert hd95(a, empty) == HD95_CAP and hd95(empty, a) == HD95_CAP
    assert hd95(a, empty, cap=50.0) == 50.0
    assert HD95_CAP == pytest.approx(np.sqrt(240**2 + 240**2 + 155**2), abs=0.005)
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="differs from truth"):
        hd95(a, a[:-1])


# --- Calibration -------------------------------------------------------------------------------


def _reference_calibration(p, y, num_bins):
    """(counts, confidence, accuracy, ECE) by a Python loop over voxels and bins."""
    edges = np.linspace(0, 1, num_bins + 1)
    members = [[] for _ in range(num_bins)]
    for p_i, y_i in zip(p.ravel().tolist(), y.ravel().tolist(), strict=True):
        b = next(b for b in range(num_bins) if p_i < edges[b + 1] or b == num_bins - 1)
        members[b].append((p_i, y_i))
    counts = [len(m) for m in members]
    confidence = [sum(p_i for p_i, _ in m) / len(m) if m else np.nan for m in members]
    accuracy = [sum(y_i for _, y_i in m) / len(m) if m else np.nan for m in members]
    ece = sum(
        n / p.size * abs(a - c) for n, a, c in zip(counts, accuracy, confidence, strict=True) if n
    )
    return np.array(counts), np.array(confidence), np.array(accuracy), ece


def test_calibration_matches_voxel_loops_with_a_mask():
    rng = np.random.default_rng(4)
    p = rng.random((7, 8, 9)).astype(np.float32) ** 2
    p[0, 0, :3] = [0.0, 1.0, 0.2]  # the edges of the [0, 1] range fall into the end bins
    y = rng.random(p.shape) < p
    brain = rng.random(p.shape) > 0.3
    p_in, y_in = p[brain].astype(np.float64), y[brain]
    counts, confidence, accuracy, ece = _reference_calibration(p_in, y_in, 10)
    bins = calibration_bins(p, y, brain, num_bins=10)
    assert np.array_equal(bins.counts, counts)
    np.testing.assert_allclose(bins.confidence, confidence, equal_nan=True)
    np.testing.assert_allclose(bins.accuracy, accuracy, equal_nan=True)
    assert expected_calibration_error(p, y, brain, num_bins=10) == pytest.approx(ece)
    brier = sum((p_i - y_i) ** 2 for p_i, y_i in zip(p_in, y_in, strict=True)) / p_in.size
    assert brier_score(p, y, brain) == pytest.approx(brier)
    nll = -sum(
        y_i * math.log(min(max(p_i, 1e-7), 1 - 1e-7))
        + (1 - y_i) * math.log(1 - min(max(p_i, 1e-7), 1 - 1e-7))
        for p_i, y_i in zip(p_in.tolist(), y_in.tolist(), strict=True)
    )
    assert negative_log_likelihood(p, y, brain) == pytest.approx(nll / p_in.size)


def test_calibration_streams_chunks_like_one_pass(monkeypatch):
    rng = np.random.default_rng(5)
    p = rng.random((20, 30))
    y = rng.random(p.shape) < 0.3
    whole = calibration_bins(p, y), brier_score(p, y), negative_log_likelihood(p, y)
    monkeypatch.setattr(metrics, "_CHUNK", 7)  # many ragged chunks
    chunked = calibration_bins(p, y), brier_score(p, y), negative_log_likelihood(p, y)
    np.testing.assert_allclose(chunked[0].counts, whole[0].counts)
    np.testing.assert_allclose(chunked[0].accuracy, whole[0].accuracy, equal_nan=True)
    np.testing.assert_allclose(chunked[0].confidence, whole[0].confidence, equal_nan=True)
    assert chunked[1:] == pytest.approx(whole[1:])


def test_perfectly_calibrated_data_has_zero_ece():
    # In each bin a constant p = c with exactly a fraction c of positives.
    p = np.repeat([0.05, 0.25, 0.5, 0.75, 0.95], 20)
    y = np.concatenate([np.arange(20) < 20 * c for c in (0.05, 0.25, 0.5, 0.75, 0.95)])
    assert expected_calibration_error(p, y, num_bins=10) == pytest.approx(0.0, abs=1e-12)
    # Confident and wrong everywhere: ECE 1, Brier 1.
    assert expected_calibration_error(np.ones(4), np.zeros(4, bool)) == pytest.approx(1.0)
    assert brier_score(np.ones(4), np.zeros(4, bool)) == 1.0


def test_nll_closed_forms():
    y = np.array([True, False, True, False])
    assert negative_log_likelihood(np.full(4, 0.5), y) == pytest.approx(math.log(2))
    assert negative_log_likelihood(np.array([0.8, 0.2, 0.8, 0.2]), y) == pytest.approx(
        -math.log(0.8)
    )
    # Certain and right costs log(1/(1 − ε)) ≈ ε; certain and wrong costs −log ε.
    assert negative_log_likelihood(y.astype(float), y) == pytest.approx(1e-7, rel=1e-3)
    assert negative_log_likelihood(1.0 - y, y, eps=1e-3) == pytest.approx(-math.log(1e-3))
    assert brier_score(np.full(4, 0.5), y) == 0.25


def test_calibration_rejects_bad_inputs():
    p, y = np.full(3, 0.5), np.zeros(3, bool)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        brier_score(np.array([0.5, 1.5, np.nan]), y)
    with pytest.raises(ValueError, match="differs from truth"):
        calibration_bins(p, y[:2])
    with pytest.raises(ValueError, match="mask shape"):
        negative_log_likelihood(p, y, mask=np.ones(2, bool))
    with pytest.raises(ValueError, match="no voxels"):
        expected_calibration_error(p, y, mask=np.zeros(3, bool))


# --- QU-BraTS ----------------------------------------------------------------------------------


def _threshold_grid(steps=40):
    """100 down to 0 in equal steps; 40 steps of 2.5 is the official scorer's grid (41 points)."""
    return [100.0 - k * (100.0 / steps) for k in range(steps + 1)]


def _reference_qubrats(prediction, truth, uncertainty, brain, thresholds):
    """QU-BraTS from the paper's definition (Mehta et al. 2022), one threshold at a time.

    At τ the voxels with uncertainty > τ are filtered; Dice of the kept voxels; FTP and FTN are
    the fractions of the brain's true positives and true negatives that were filtered. AUCs by
    explicit trapezoids over τ / 100.
    """
    tp_all = np.count_nonzero(prediction & truth & brain)
    tn_all = np.count_nonzero(~prediction & ~truth & brain)
    dice_curve, ftp, ftn = [], [], []
    for tau in thresholds:
        keep = uncertainty <= tau
        dice_curve.append(dice(prediction[keep], truth[keep]))
        tp_kept = np.count_nonzero((prediction & truth & brain)[keep])
        tn_kept = np.count_nonzero((~prediction & ~truth & brain)[keep])
        ftp.append((tp_all - tp_kept) / tp_all if tp_all else 0.0)
        ftn.append((tn_all - tn_kept) / tn_all if tn_all else 0.0)

    def auc(curve):
        x = np.asarray(thresholds) / 100
        return sum((x[i] - x[i + 1]) * (curve[i] + curve[i + 1]) / 2 for i in range(len(x) - 1))

    score = (auc(dice_curve) + (1 - auc(ftp)) + (1 - auc(ftn))) / 3
    return dice_curve, ftp, ftn, auc(dice_curve), auc(ftp), auc(ftn), score


def _official_transcription(truth, prediction, uncertainty, brain, num_points=40):
    """The official QU-BraTS scorer's algorithm (its NumPy 1.x behaviour), re-implemented.

    Per threshold a float32 mask of the certain voxels (uncertainty > τ is uncertain); Dice
    of the masked truth and prediction, 1 when both sums are 0; FTP and FTN with TP and TN
    weighted by the brain mask and a float32-eps denominator; AUC the trapezoid area over the
    descending thresholds (taken as positive), divided by 100. Returns the three AUCs.
    """
    eps = np.finfo(np.float32).eps
    truth, prediction = truth.astype(np.float32), prediction.astype(np.float32)
    brain = brain.astype(np.float32)
    tp = prediction * truth * brain
    tn = (1 - prediction) * (1 - truth) * brain
    thresholds = _threshold_grid(num_points)
    curves = {"dice": [], "ftp": [], "ftn": []}
    for th in thresholds:
        certain = np.where(uncertainty > th, 0.0, 1.0).astype(np.float32)
        kept_truth, kept_prediction = truth * certain, prediction * certain
        overlap = np.sum(kept_truth * kept_prediction)
        total = np.sum(kept_truth) + np.sum(kept_prediction)
        curves["dice"].append(1.0 if total == 0 else 2.0 * overlap / total)
        for name, counted in (("ftp", tp), ("ftn", tn)):
            before, after = counted.sum(), (counted * certain).sum()
            curves[name].append((before - after) / (before + eps))
    x = np.asarray(thresholds)
    # Decreasing x: the trapezoid sum is negative, and its sign is flipped.
    return {
        name: -float(np.trapezoid(np.asarray(curve, np.float64), x)) / 100.0
        for name, curve in curves.items()
    }


def _segmentation_case(rng, shape=(10, 11, 9)):
    truth = ndimage.binary_dilation(rng.random(shape) > 0.95, iterations=2)
    prediction = truth ^ (rng.random(shape) > 0.85)
    brain = np.zeros(shape, bool)
    brain[1:-1, 1:-1, 1:-1] = True
    return prediction, truth, brain


def test_qubrats_default_grid_is_the_official_41_points():
    rng = np.random.default_rng(9)
    prediction, truth, brain = _segmentation_case(rng)
    got = qubrats(prediction, truth, rng.random(truth.shape) * 100, brain).thresholds
    assert got.shape == (41,)
    # Exactly 100, 97.5, ..., 2.5, 0: uncertainties on a grid value must compare exactly.
    assert got.tolist() == [100 - 2.5 * k for k in range(41)]
    assert got.tolist() == _threshold_grid(40)


@pytest.mark.parametrize("num_thresholds", [41, 7])
def test_qubrats_matches_the_paper_definition(num_thresholds):
    rng = np.random.default_rng(6)
    prediction, truth, brain = _segmentation_case(rng)
    assert (prediction & truth & ~brain).any()  # FTP must ignore these true positives
    # Integer values, some exactly on a threshold (0, 100, 50 for T = 7): τ must keep u = τ.
    uncertainty = np.round(rng.random(truth.shape) * 100)
    uncertainty[prediction & truth & ~brain] = 100.0  # filtered below τ = 100, yet not in FTP
    got = qubrats(prediction, truth, uncertainty, brain, num_thresholds)
    thresholds = _threshold_grid(num_thresholds - 1)
    want = _reference_qubrats(prediction, truth, uncertainty, brain, thresholds)
    np.testing.assert_allclose(got.thresholds, thresholds, rtol=0, atol=1e-12)
    for got_value, want_value in zip(got[1:], want, strict=True):
        np.testing.assert_allclose(got_value, want_value, rtol=1e-12, atol=1e-12)
    assert got.dice[0] == pytest.approx(dice(prediction, truth))
    assert got.ftp[0] == 0.0 and got.ftn[0] == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_qubrats_default_matches_the_official_algorithm(seed):
    rng = np.random.default_rng(100 + seed)
    shape = (14, 12, 10)
    truth = ndimage.binary_dilation(rng.random(shape) > 0.96, iterations=2)
    prediction = truth ^ (rng.random(shape) > 0.8)
    brain = ndimage.binary_erosion(np.ones(shape, bool), iterations=3)
    brain[:, :, : seed + 1] = True  # a brain slab reaching the edge, so that its shape varies
    assert (prediction & truth & ~brain).sum() > 5 and (prediction & truth & brain).any()
    # Integers (QU-BraTS maps are uint8) and multiples of 2.5, so many sit on a threshold.
    uncertainty = np.where(
        rng.random(shape) < 0.5,
        rng.integers(0, 101, shape).astype(np.float64),
        2.5 * rng.integers(0, 41, shape),
    )
    # Errors tend to be uncertain; the true positives outside the brain are filtered early.
    uncertainty[(prediction != truth) & (rng.random(shape) < 0.6)] = 97.5
    outside = prediction & truth & ~brain
    uncertainty[outside] = rng.choice([90.0, 95.0, 100.0], size=int(outside.sum()))
    got = qubrats(prediction, truth, uncertainty, brain)
    want = _official_transcription(truth, prediction, uncertainty, brain)
    assert got.dice_auc == pytest.approx(want["dice"], abs=1e-6)
    assert got.ftp_auc == pytest.approx(want["ftp"], abs=1e-6)
    assert got.ftn_auc == pytest.approx(want["ftn"], abs=1e-6)


def test_perfect_uncertainty_beats_random_uncertainty():
    rng = np.random.default_rng(7)
    prediction, truth, brain = _segmentation_case(rng)
    perfect = np.where(prediction != truth, 100.0, 0.0)
    best = qubrats(prediction, truth, perfect, brain)
    # Below τ = 100 the errors are gone and nothing correct was filtered.
    assert np.all(best.dice[1:] == 1.0) and np.all(best.ftp == 0) and np.all(best.ftn == 0)
    random = qubrats(prediction, truth, rng.random(truth.shape) * 100, brain)
    assert best.score > random.score + 0.1


def test_qubrats_closed_forms():
    rng = np.random.default_rng(8)
    prediction, truth, brain = _segmentation_case(rng)
    plain = dice(prediction, truth)
    # Uncertainty 0 is never above a threshold ≥ 0: nothing is filtered anywhere.
    certain = qubrats(prediction, truth, np.zeros(truth.shape), brain)
    assert np.allclose(certain.dice, plain) and not certain.ftp.any() and not certain.ftn.any()
    assert certain.score == pytest.approx((plain + 2) / 3)
    # Uncertainty 100 is filtered at every τ < 100: Dice 1 (nothing left), FTP = FTN = 1,
    # so each curve is 1 except at the last of the 40 trapezoid steps of 2.5 / 100.
    step = 1 / 40
    unsure = qubrats(prediction, truth, np.full(truth.shape, 100.0), brain)
    assert unsure.dice_auc == pytest.approx(1 - step + step * (1 + plain) / 2)
    assert unsure.ftp_auc == pytest.approx(1 - step / 2) == unsure.ftn_auc
    # No true positives: FTP is 0 by convention.
    no_tp = qubrats(np.zeros_like(truth), truth, rng.random(truth.shape) * 100, brain)
    assert not no_tp.ftp.any() and no_tp.ftp_auc == 0.0
    # True positives only outside the brain: none count for FTP, which is 0 (the brain mask
    # does not restrict Dice: there they are a perfect match until filtered).
    outside = prediction & truth & ~brain
    assert outside.any()
    only_outside = qubrats(outside, outside, rng.random(truth.shape) * 100, brain)
    assert not only_outside.ftp.any() and only_outside.ftp_auc == 0.0
    assert only_outside.dice.tolist() == [1.0] * 41


def test_qubrats_rejects_bad_inputs():
    prediction = truth = np.zeros((3, 3), bool)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        qubrats(prediction, truth, np.full((3, 3), 101.0))
    with pytest.raises(ValueError, match="uncertainty shape"):
        qubrats(prediction, truth, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        qubrats(prediction, truth, np.zeros((3, 3)), num_thresholds=1)


# --- Uncertainty against errors ----------------------------------------------------------------


def _pairwise_auroc(uncertainty, error):
    """AUROC by counting every (error, correct) pair: 1 if the error is more uncertain, ½ a tie."""
    errors, correct = uncertainty[error].tolist(), uncertainty[~error].tolist()
    wins = sum((u_e > u_c) + 0.5 * (u_e == u_c) for u_e in errors for u_c in correct)
    return wins / (len(errors) * len(correct))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_the_pairwise_count_with_ties_and_a_mask(seed):
    rng = np.random.default_rng(200 + seed)
    shape = (6, 7, 5)
    truth = rng.random(shape) < 0.3
    prediction = truth ^ (rng.random(shape) < rng.uniform(0.05, 0.5))
    # Few distinct values, so that many errors tie with correct voxels (and with each other).
    uncertainty = rng.integers(0, 4 + seed, shape).astype(np.float32) / 3
    uncertainty[prediction != truth] += rng.integers(0, 2, int((prediction != truth).sum()))
    brain = rng.random(shape) > 0.2
    error = (prediction != truth)[brain]
    want = _pairwise_auroc(uncertainty[brain].astype(np.float64), error)
    got = error_detection_auroc(uncertainty, prediction, truth, brain)
    assert got == pytest.approx(want, rel=1e-12)
    # The Mann–Whitney U statistic of scipy gives the same area.
    u = stats.mannwhitneyu(uncertainty[brain][error], uncertainty[brain][~error]).statistic
    assert got == pytest.approx(u / (error.sum() * (~error).sum()), rel=1e-12)
    # No mask: the whole volume.
    whole = _pairwise_auroc(uncertainty.astype(np.float64).ravel(), (prediction != truth).ravel())
    assert error_detection_auroc(uncertainty, prediction, truth) == pytest.approx(whole)


def test_auroc_perfect_reversed_and_random_uncertainty():
    rng = np.random.default_rng(11)
    truth = rng.random((40, 50, 10)) < 0.4
    prediction = truth ^ (rng.random(truth.shape) < 0.1)
    error = prediction != truth
    assert error_detection_auroc(error.astype(float), prediction, truth) == 1.0
    assert error_detection_auroc(1.0 - error, prediction, truth) == 0.0
    # Constant uncertainty ties everything: ½ exactly.
    assert error_detection_auroc(np.zeros(truth.shape), prediction, truth) == 0.5
    random = error_detection_auroc(rng.random(truth.shape), prediction, truth)
    assert random == pytest.approx(0.5, abs=0.02)
    # Only the order matters: a monotone transform leaves the AUROC unchanged.
    u = rng.random(truth.shape) + error
    assert error_detection_auroc(np.exp(3 * u), prediction, truth) == pytest.approx(
        error_detection_auroc(u, prediction, truth), abs=1e-15
    )


def test_auroc_is_nan_without_errors_or_without_correct_voxels():
    rng = np.random.default_rng(12)
    truth = rng.random((5, 6)) < 0.5
    u = rng.random(truth.shape)
    assert math.isnan(error_detection_auroc(u, truth, truth))
    assert math.isnan(error_detection_auroc(u, ~truth, truth))
    # Errors only outside the brain count as none.
    prediction = truth.copy()
    prediction[0, 0] = ~prediction[0, 0]
    brain = np.ones(truth.shape, bool)
    brain[0, 0] = False
    assert math.isnan(error_detection_auroc(u, prediction, truth, brain))
    assert math.isnan(error_detection_auroc(u, prediction, truth, np.zeros(truth.shape, bool)))


def test_uncertainty_error_metrics_reject_bad_inputs():
    a = np.zeros((3, 3), bool)
    with pytest.raises(ValueError, match="truth shape"):
        error_detection_auroc(np.zeros((3, 3)), a, a[:2])
    with pytest.raises(ValueError, match="mask shape"):
        uncertainty_error_overlap(np.zeros((3, 3)), a, a, 0.5, mask=a[:2])
    with pytest.raises(ValueError, match="finite"):
        error_detection_auroc(np.full((3, 3), np.nan), a, a)
    with pytest.raises(ValueError, match="1-D"):
        uncertainty_error_overlap_curve(np.zeros((3, 3)), a, a, thresholds=np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"\[T\] or \[N, T\]"):
        best_uncertainty_error_overlap(np.zeros((2, 3)), thresholds=(0.1, 0.2))
    with pytest.raises(ValueError, match="no curves"):
        best_uncertainty_error_overlap(np.zeros((0, 2)), thresholds=(0.1, 0.2))
    with pytest.raises(ValueError, match="mask shape"):
        mean_uncertainty(np.zeros((3, 3)), a[:2])


@pytest.mark.parametrize("seed", range(3))
def test_ueo_matches_a_direct_dice(seed):
    rng = np.random.default_rng(300 + seed)
    shape = (8, 9, 7)
    truth = rng.random(shape) < 0.3
    prediction = truth ^ (rng.random(shape) < 0.15)
    error = prediction != truth
    # Normalised uncertainty, higher on errors; some values exactly on a grid threshold.
    uncertainty = np.clip(rng.random(shape) * 0.7 + 0.3 * error, 0, 1)
    uncertainty.ravel()[:20] = rng.choice(UEO_THRESHOLDS, 20)
    brain = rng.random(shape) > 0.25
    curve = uncertainty_error_overlap_curve(uncertainty, prediction, truth, mask=brain)
    assert curve.shape == (len(UEO_THRESHOLDS),)
    for t, got in zip(UEO_THRESHOLDS, curve, strict=True):
        uncertain = uncertainty[brain] > t  # strictly above t is "uncertain"
        want = dice(uncertain, error[brain])
        assert got == pytest.approx(want, rel=1e-12)
        assert uncertainty_error_overlap(uncertainty, prediction, truth, t, brain) == got
        # As a set formula, 2 |E ∩ U| / (|E| + |U|).
        e_set = set(np.flatnonzero(error & brain))
        u_set = set(np.flatnonzero((uncertainty > t) & brain))
        assert got == pytest.approx(2 * len(e_set & u_set) / (len(e_set) + len(u_set)))
    whole = [dice(uncertainty > t, error) for t in UEO_THRESHOLDS]
    np.testing.assert_allclose(
        uncertainty_error_overlap_curve(uncertainty, prediction, truth), whole, rtol=1e-12
    )


def test_ueo_closed_forms():
    rng = np.random.default_rng(13)
    truth = rng.random((10, 10)) < 0.4
    prediction = truth ^ (rng.random(truth.shape) < 0.2)
    error = prediction != truth
    # The error indicator itself overlaps perfectly at any t in [0, 1).
    assert uncertainty_error_overlap(error.astype(float), prediction, truth, 0.5) == 1.0
    # Nothing uncertain: Dice 0 while there are errors; no errors either: 1 by convention.
    assert uncertainty_error_overlap(np.zeros(truth.shape), prediction, truth, 0.5) == 0.0
    assert uncertainty_error_overlap(np.zeros(truth.shape), truth, truth, 0.5) == 1.0
    # Everything uncertain: 2|E| / (|E| + n).
    everything = uncertainty_error_overlap(np.ones(truth.shape), prediction, truth, 0.5)
    assert everything == pytest.approx(2 * error.sum() / (error.sum() + error.size))


def test_best_ueo_per_case_and_over_cases():
    thresholds = (0.1, 0.5, 0.9)
    one = np.array([0.2, 0.7, 0.7])
    assert best_uncertainty_error_overlap(one, thresholds) == (0.5, 0.7)  # first maximum
    cases = np.array([[0.9, 0.1, 0.0], [0.0, 0.6, 0.5], [0.0, 0.5, 0.4]])
    # Per case the maxima are at 0.1, 0.5, 0.5; the mean curve (0.3, 0.4, 0.3) peaks at 0.5.
    best = best_uncertainty_error_overlap(cases, thresholds)
    assert best.threshold == 0.5 and best.ueo == pytest.approx(0.4)
    # End to end on the default grid.
    rng = np.random.default_rng(14)
    truth = rng.random((6, 6, 6)) < 0.3
    prediction = truth ^ (rng.random(truth.shape) < 0.2)
    u = np.clip(rng.random(truth.shape) * 0.5 + 0.5 * (prediction != truth), 0, 1)
    curve = uncertainty_error_overlap_curve(u, prediction, truth)
    got = best_uncertainty_error_overlap(curve)
    assert got.ueo == curve.max() and got.threshold == UEO_THRESHOLDS[int(curve.argmax())]


@pytest.mark.parametrize("seed", range(4))
def test_spearman_matches_scipy_with_ties(seed):
    rng = np.random.default_rng(400 + seed)
    n = 5 + 7 * seed
    x = rng.integers(0, 4, n).astype(float)  # many ties
    y = 0.5 * x + rng.normal(size=n)
    if seed % 2:
        y = np.round(y)
    want = stats.spearmanr(x, y).statistic
    assert spearman_correlation(x, y) == pytest.approx(want, rel=1e-12, abs=1e-14)
    assert spearman_correlation(x, -y) == pytest.approx(-want, rel=1e-12, abs=1e-14)


def test_spearman_closed_forms_and_undefined_cases():
    x = np.array([0.1, 0.4, 0.2, 0.9])
    assert spearman_correlation(x, np.exp(x)) == 1.0
    assert spearman_correlation(x, -(x**3)) == -1.0
    assert math.isnan(spearman_correlation(x, np.ones(4)))  # constant: undefined
    assert math.isnan(spearman_correlation(x[:1], x[:1]))
    with pytest.raises(ValueError, match="1-D"):
        spearman_correlation(x, x[:3])
    with pytest.raises(ValueError, match="finite"):
        spearman_correlation(np.array([0.0, np.nan]), np.array([0.0, 1.0]))


def test_mean_uncertainty_and_case_level_failure_detection():
    rng = np.random.default_rng(15)
    u = rng.random((5, 6, 7)).astype(np.float32)
    brain = rng.random(u.shape) > 0.5
    assert mean_uncertainty(u, brain) == pytest.approx(u[brain].astype(np.float64).mean())
    assert mean_uncertainty(u, None) == pytest.approx(u.astype(np.float64).mean())
    assert math.isnan(mean_uncertainty(u, np.zeros(u.shape, bool)))
    # Cases whose uncertainty rises as their Dice falls: ρ = −1.
    cases = [(u * s, 1.0 - 0.1 * s) for s in (0.5, 1.0, 2.0, 3.0)]
    scores = [mean_uncertainty(case_u, brain) for case_u, _ in cases]
    assert spearman_correlation(scores, [d for _, d in cases]) == pytest.approx(-1.0)


def test_brier_and_nll_match_plain_numpy():
    rng = np.random.default_rng(16)
    p = rng.random((6, 7, 8)).astype(np.float32)
    y = rng.random(p.shape) < p
    brain = rng.random(p.shape) > 0.3
    p64, y64 = p[brain].astype(np.float64), y[brain].astype(np.float64)
    assert brier_score(p, y, brain) == pytest.approx(np.mean((p64 - y64) ** 2), rel=1e-12)
    clipped = np.clip(p64, 1e-7, 1 - 1e-7)
    nll = -np.mean(y64 * np.log(clipped) + (1 - y64) * np.log(1 - clipped))
    assert negative_log_likelihood(p, y, brain) == pytest.approx(nll, rel=1e-12)
