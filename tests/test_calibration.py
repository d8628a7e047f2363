"""Temperature scaling: recovers a known temperature, keeps the labels, reports held-out ECE."""

import numpy as np
import pytest

from vi_seg_jax.calibration import (
    apply_temperature,
    calibrate,
    fit_region_temperatures,
    fit_temperature,
    region_probabilities,
    region_truth,
)
from vi_seg_jax.metrics import expected_calibration_error, negative_log_likelihood


def _overconfident(temperature, n=200_000, seed=0):
    """Labels drawn from σ(z); the model reports σ(z · temperature)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=2.0, size=n)
    truth = rng.random(n) < 1.0 / (1.0 + np.exp(-z))
    return 1.0 / (1.0 + np.exp(-z * temperature)), truth


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_fit_recovers_the_temperature_that_generated_the_miscalibration(temperature):
    probs, truth = _overconfident(temperature)
    assert fit_temperature(probs, truth) == pytest.approx(temperature, rel=0.03)


def test_scaling_lowers_nll_and_ece_and_keeps_the_segmentation():
    probs, truth = _overconfident(3.0)
    fitted = apply_temperature(probs, fit_temperature(probs, truth))
    assert negative_log_likelihood(fitted, truth) < negative_log_likelihood(probs, truth)
    assert expected_calibration_error(fitted, truth) < 0.3 * expected_calibration_error(
        probs, truth
    )
    np.testing.assert_array_equal(fitted > 0.5, probs > 0.5)


def test_apply_is_the_scaled_sigmoid_per_region():
    probs = np.random.default_rng(1).uniform(1e-4, 1 - 1e-4, size=(5, 6, 3)).astype(np.float32)
    temperatures = np.array([0.5, 1.0, 2.5])
    scaled = apply_temperature(probs, temperatures)
    logits = np.log(probs.astype(np.float64)) - np.log1p(-probs.astype(np.float64))
    np.testing.assert_allclose(scaled, 1 / (1 + np.exp(-logits / temperatures)), rtol=1e-6)
    np.testing.assert_allclose(scaled[..., 1], probs[..., 1], atol=1e-6)  # T = 1: identity


def test_held_out_ece_scores_each_case_with_the_others_temperature():
    # Two cases miscalibrated in opposite directions: the in-sample fit splits the
    # difference, held out each case gets the other's (wrong) temperature.
    a, y_a = _overconfident(0.5, n=40_000, seed=4)
    b, y_b = _overconfident(3.0, n=40_000, seed=5)
    masks = [np.ones(40_000, bool)] * 2
    report = calibrate([a[:, None], b[:, None]], [y_a[:, None], y_b[:, None]], masks, "wt")
    cross = np.concatenate(
        [
            apply_temperature(a, fit_temperature(b, y_b)),
            apply_temperature(b, fit_temperature(a, y_a)),
        ]
    )
    want = expected_calibration_error(cross, np.concatenate([y_a, y_b]))
    assert report["ece_after_held_out"]["wt"] == pytest.approx(want, rel=1e-3)
    assert report["ece_after_held_out"]["wt"] > 1.5 * report["ece_after_in_sample"]["wt"]
    before = expected_calibration_error(np.concatenate([a, b]), np.concatenate([y_a, y_b]))
    assert report["ece_before"]["wt"] == pytest.approx(before)
    single = calibrate([a[:, None]], [y_a[:, None]], masks[:1], "wt")
    assert single["ece_after_held_out"] is None
    assert single["ece_after_in_sample"]["wt"] < 0.3 * single["ece_before"]["wt"]


def test_mask_restricts_the_fit():
    probs, truth = _overconfident(2.0, n=20_000)
    mask = np.zeros_like(truth)
    mask[:10_000] = True
    # Outside the mask, a region of confidently wrong voxels the fit must ignore.
    probs = np.where(mask, probs, 0.999)
    truth = np.where(mask, truth, False)
    assert fit_temperature(probs, truth, mask) == pytest.approx(2.0, rel=0.1)
    with pytest.raises(ValueError, match="no voxels"):
        fit_temperature(probs, truth, np.zeros_like(mask))


def test_region_helpers_and_pooled_fit():
    classes = np.array([[0, 1], [2, 3]], np.uint8)  # background, core, edema, enhancing
    np.testing.assert_array_equal(region_truth(classes, "wt")[..., 0], classes > 0)
    assert region_truth(classes, "regions").shape == (2, 2, 3)
    mean = np.stack([1 - np.full((2, 2), 0.3), np.full((2, 2), 0.3)], -1)
    np.testing.assert_allclose(region_probabilities(mean, "wt")[..., 0], 0.3)

    a, y_a = _overconfident(2.0, n=30_000, seed=2)
    b, y_b = _overconfident(2.0, n=30_000, seed=3)
    temperatures = fit_region_temperatures(
        [a[:, None], b[:, None]],
        [y_a[:, None], y_b[:, None]],
        [np.ones(30_000, bool), np.ones(30_000, bool)],
        "wt",
    )
    assert set(temperatures) == {"wt"} and temperatures["wt"] == pytest.approx(2.0, rel=0.05)
