import numpy as np
import pytest

from vi_seg_jax.metrics import calibration_bins, qubrats
from vi_seg_jax.plots import (
    CaseVolumes,
    overview_figure,
    qubrats_figure,
    reliability_figure,
    shift_figure,
    tumour_centre,
)


@pytest.fixture
def case():
    rng = np.random.default_rng(0)
    truth = rng.random((12, 12, 8)) > 0.7
    p = np.clip(truth * 0.6 + rng.random(truth.shape) * 0.4, 0, 1)
    return rng, truth, p


def _is_nontrivial_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_reliability_figure_is_written(tmp_path, case):
    _, truth, p = case
    bins = {"wt before": calibration_bins(p, truth), "wt after": calibration_bins(p**2, truth)}
    # Empty bins (all p in a few bins) must not break the log-scale count panel.
    bins["sparse"] = calibration_bins(np.round(p), truth)
    path = reliability_figure(tmp_path / "sub" / "reliability.png", bins, title="calibration")
    assert path == tmp_path / "sub" / "reliability.png" and _is_nontrivial_png(path)


def test_qubrats_figure_is_written(tmp_path, case):
    rng, truth, p = case
    prediction = p > 0.5
    curves = {
        "wt": qubrats(prediction, truth, rng.random(truth.shape) * 100),
        "tc": qubrats(prediction, truth, np.where(prediction != truth, 100.0, 0.0)),
    }
    path = qubrats_figure(tmp_path / "qubrats.png", curves, title="case 0")
    assert _is_nontrivial_png(path)


def test_figures_reject_empty_and_mismatched_inputs(tmp_path, case):
    rng, truth, p = case
    with pytest.raises(ValueError, match="empty"):
        reliability_figure(tmp_path / "r.png", {})
    with pytest.raises(ValueError, match="empty"):
        qubrats_figure(tmp_path / "q.png", {})
    bins = calibration_bins(p, truth)
    with pytest.raises(ValueError, match="disagree"):
        reliability_figure(tmp_path / "r.png", {"bad": bins._replace(edges=bins.edges[:-1])})
    curves = qubrats(p > 0.5, truth, rng.random(truth.shape) * 100)
    with pytest.raises(ValueError, match="differ in length"):
        qubrats_figure(tmp_path / "q.png", {"bad": curves._replace(dice=curves.dice[:-1])})
    assert not any(tmp_path.iterdir())


def test_overview_figure_shows_three_views_through_the_tumour(tmp_path):
    truth = np.zeros((20, 16, 12), bool)
    truth[12:16, 4:8, 2:6] = True
    assert tumour_centre(truth) == (14, 6, 4)  # (12+15)/2 = 13.5 rounds to even 14
    maps = {
        "image": np.random.default_rng(0).normal(size=truth.shape),
        "prediction": truth,
        "aleatoric": truth * 0.2,
        "epistemic": truth * 0.1,
    }
    path = overview_figure(
        tmp_path / "overview.png", CaseVolumes(truth=truth, **maps), title="case"
    )
    assert _is_nontrivial_png(path)
    without_truth = overview_figure(tmp_path / "no_truth.png", CaseVolumes(truth=None, **maps))
    assert _is_nontrivial_png(without_truth)
    with pytest.raises(ValueError, match="3D shape"):
        overview_figure(tmp_path / "bad.png", CaseVolumes(truth=truth[:-1], **maps))


def test_shift_figure_draws_mean_and_std_over_repeats_per_method(tmp_path, monkeypatch):
    import matplotlib.axes

    rows = [
        {"method": m, "level": level, "repeat": r, "dice": d - 0.1 * level + 0.01 * r,
         "mean_uncertainty": 0.02 * (1 + level)}
        for m, d in (("vi", 0.8), ("deterministic", 0.7))
        for level in (0, 1, 3)
        for r in range(3)
    ]  # fmt: skip
    drawn = []
    original = matplotlib.axes.Axes.errorbar

    def spy(self, x, y, yerr=None, **kwargs):
        drawn.append((kwargs["label"], list(x), list(y), list(yerr)))
        return original(self, x, y, yerr=yerr, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", spy)
    path = shift_figure(tmp_path / "shift.png", rows, title="scanner")
    assert _is_nontrivial_png(path)
    # Two panels (Dice, mean uncertainty) × two methods; Dice in %: mean 100 (d − 0.1 level
    # + 0.01), std 100 · 0.01 · sqrt(2/3) over the three repeats.
    assert [d[0] for d in drawn] == ["vi", "deterministic"] * 2
    _, levels, means, stds = drawn[0]
    assert levels == [0, 1, 3]
    np.testing.assert_allclose(means, [81.0, 71.0, 51.0])
    np.testing.assert_allclose(stds, [np.sqrt(2 / 3)] * 3)
    np.testing.assert_allclose(drawn[2][2], [2.0, 4.0, 8.0])  # uncertainty × 100
    with pytest.raises(ValueError, match="no rows"):
        shift_figure(tmp_path / "empty.png", [])
    with pytest.raises(ValueError, match="lack the panel key"):
        shift_figure(tmp_path / "bad.png", [{"method": "vi", "level": 0, "dice": 0.5}])
