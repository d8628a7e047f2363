"""Temperature scaling: recovers a known temperature, is exactly invertible, keeps the labels."""

import numpy as np
import pytest

from vi_seg_jax.calibration import (
    apply_temperature,
    fit_region_temperatures,
    fit_temperature,
    invert_temperature,
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


def test_invert_undoes_apply_per_region():
    probs = np.random.default_rng(1).uniform(1e-4, 1 - 1e-4, size=(5, 6, 3)).astype(np.float32)
    temperatures = np.array([0.5, 1.0, 2.5])
    scaled = apply_temperature(probs, temperatures)
    np.testing.assert_allclose(invert_temperature(scaled, temperatures), probs, atol=2e-6)
    np.testing.assert_allclose(scaled[..., 1], probs[..., 1], atol=1e-6)  # T = 1: identity


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
