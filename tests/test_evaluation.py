"""Evaluation helpers, and the out-of-distribution behaviour of a trained model."""

import json

import jax
import numpy as np
import pytest

from experiments import train
from vi_seg_jax.brats_metrics import BRATS_METRICS, label_groups, to_columns
from vi_seg_jax.data.conventions import BRATS_2018_2021, BRATS_2023, MSD_TASK01
from vi_seg_jax.data.discovery import discover_cases
from vi_seg_jax.data.preprocess import brain_mask
from vi_seg_jax.data.synthetic import write_dataset
from vi_seg_jax.evaluation import (
    METRICS,
    CaseScores,
    epistemic_away_from_abnormality,
    markdown_table,
    mean_curves,
    pool_bins,
    summarize,
)
from vi_seg_jax.metrics import HD95_CAP, calibration_bins, qubrats
from vi_seg_jax.predict import Predictor, load_trained


def test_pooled_bins_equal_the_bins_of_the_concatenated_cases():
    rng = np.random.default_rng(0)
    cases = [(rng.random(500), rng.random(500) > 0.6) for _ in range(3)]
    pooled = pool_bins([calibration_bins(p, y, num_bins=10) for p, y in cases])
    direct = calibration_bins(
        np.concatenate([p for p, _ in cases]), np.concatenate([y for _, y in cases]), num_bins=10
    )
    np.testing.assert_array_equal(pooled.counts, direct.counts)
    np.testing.assert_allclose(pooled.confidence, direct.confidence, rtol=1e-9)
    np.testing.assert_allclose(pooled.accuracy, direct.accuracy, rtol=1e-9)


def test_mean_curves_average_each_field():
    rng = np.random.default_rng(1)
    truth = rng.random((8, 8, 8)) > 0.5
    curves = [qubrats(rng.random(truth.shape) > 0.5, truth, rng.random(truth.shape) * 100)
              for _ in range(2)]  # fmt: skip
    mean = mean_curves(curves)
    assert mean.score == pytest.approx((curves[0].score + curves[1].score) / 2)
    np.testing.assert_allclose(mean.dice, (curves[0].dice + curves[1].dice) / 2)


def test_markdown_table_reports_dice_and_iou_in_percent():
    metrics = ("dice", "iou", "hd95", "ece", "ece_uncalibrated", "brier", "nll", "qubrats_score")
    summary = {"wt": {m: {"mean": 0.5, "std": 0.1, "n": 2} for m in metrics}}
    row = markdown_table(summary, ("wt",)).splitlines()[-1]
    assert row.startswith("| WT | 50 ± 10 | 50 ± 10 | 0.5 ± 0.1 |")


def test_markdown_table_appends_the_lesion_wise_brats_metrics_when_scored():
    metrics = (*METRICS, *BRATS_METRICS)
    summary = {"wt": {m: {"mean": 0.5, "std": 0.1, "n": 2} for m in metrics}}
    header, _, row = markdown_table(summary, ("wt",)).splitlines()
    assert header.endswith("| lesion_dice | lesion_hd95 | lesion_nsd | lesion_pq |")
    assert row.startswith("| WT | 50 ± 10 | 50 ± 10 | 0.5 ± 0.1 |")
    assert row.endswith("| 50 ± 10 | 0.5 ± 0.1 | 0.5 ± 0.1 | 50 ± 10 |")


def test_summarize_leaves_the_lesion_wise_nans_out_and_counts_the_values():
    def case(value):
        values = {"lesion_dice": value, "lesion_pq": np.nan, "dice": value}
        return CaseScores("c", {"wt": values}, {}, {})

    metrics = ("lesion_dice", "lesion_pq", "dice")
    summary = summarize([case(0.5), case(np.nan), case(1.0)], ("wt",), metrics)["wt"]
    assert summary["lesion_dice"] == {"mean": 0.75, "std": 0.25, "n": 2}
    empty = summary["lesion_pq"]  # no value at all: NaN, without a warning
    assert np.isnan(empty["mean"]) and np.isnan(empty["std"]) and empty["n"] == 0
    assert np.isnan(summary["dice"]["mean"]) and summary["dice"]["n"] == 3  # stays loud


def test_brats_label_groups_follow_each_release_convention():
    regions = ("wt", "tc", "et")
    expected = [
        (BRATS_2023, {"wt": [1, 2, 3], "tc": [1, 3], "et": [3]}),  # the bundled `gli` groups
        (BRATS_2018_2021, {"wt": [1, 2, 4], "tc": [1, 4], "et": [4]}),
        (MSD_TASK01, {"wt": [1, 2, 3], "tc": [2, 3], "et": [3]}),
    ]
    for convention, groups in expected:
        assert label_groups(convention, regions) == groups
        # A `wt` run's 0/1 mask: label 1 lies in every convention's whole tumour.
        assert 1 in label_groups(convention, ("wt",))["wt"]


def test_brats_columns_cap_an_infinite_hd95_and_keep_nan():
    result = {"sq_dsc": 0.0, "sq_hd95": np.inf, "sq_nsd": 0.0, "pq_dsc": 0.0, "tp": 0, "fp": 1}
    columns = to_columns(result)
    assert columns["lesion_hd95"] == HD95_CAP and columns["lesion_fp"] == 1.0
    assert np.isnan(columns["lesion_fn"])  # absent from the result
    assert list(columns) == list(BRATS_METRICS)


def test_epistemic_away_from_abnormality_excludes_a_margin():
    brain = np.ones((9, 9, 9), bool)
    abnormal = np.zeros_like(brain)
    abnormal[4, 4, 4] = True
    epistemic = np.zeros((9, 9, 9))
    epistemic[2:7, 2:7, 2:7] = 1.0  # within 2 voxels (face-connected) only partly
    near = np.zeros_like(brain)
    near[4, 4, 4] = True
    from scipy import ndimage

    near = ndimage.binary_dilation(near, iterations=2)
    expected = epistemic[~near].mean()
    assert epistemic_away_from_abnormality(epistemic, brain, abnormal) == pytest.approx(expected)
    with pytest.raises(ValueError, match="no brain voxels"):
        epistemic_away_from_abnormality(epistemic, abnormal, abnormal)


def test_epistemic_uncertainty_is_higher_on_a_domain_never_trained_on(tmp_path, monkeypatch):
    """A 2D Bayesian U-Net trained on tumour cases, shown small-lesion cases (method.md §6).

    Measured while writing this test (100 steps): mean epistemic variance away from the
    abnormality 0.0008 in-domain vs 0.0024 on the lesions domain; over the whole brain the
    order is reversed (0.0057 vs 0.0034) because large tumours carry more boundary. With the
    40 steps of 2 epochs used here (ending half-way through the 4-epoch KL warm-up, as the
    100 steps did): 0.0017 vs 0.0050, best validation Dice 0.82.
    """
    monkeypatch.setenv("VI_SEG_JAX_CACHE", str(tmp_path / "cache"))
    tumours, lesions = tmp_path / "tumours", tmp_path / "lesions"
    write_dataset(tumours, num_cases=10, seed=3)
    write_dataset(lesions, num_cases=3, domain="lesions", seed=4)
    workdir = tmp_path / "run"
    argv = [
        "--data-dir", str(tumours), "--workdir", str(workdir),
        "--spatial-dims", "2", "--patch", "64", "64", "--batch-size", "8",
        "--steps", "40", "--steps-per-epoch", "20",
        "--test-size", "3", "--validation-size", "1", "--train-size", "6",
        "--no-progress", "--no-tensorboard",
    ]  # fmt: skip
    with jax.numpy_dtype_promotion("standard"):
        assert train.main(argv) == 0
    assert json.loads((workdir / "summary.json").read_text())["best_val_dice"] > 0.7

    predictor = Predictor(load_trained(workdir), num_samples=8)
    test_ids = set(json.loads((workdir / "splits.json").read_text())["test"])

    def statistic(cases):
        values = []
        for case in cases:
            out = predictor.predict_case(case, progress=False)
            abnormal = (out.truth > 0) | (out.labels > 0)
            brain = brain_mask(out.image)
            values.append(epistemic_away_from_abnormality(out.epistemic[..., 0], brain, abnormal))
        return float(np.mean(values))

    in_domain = statistic([c for c in discover_cases(tumours).cases if c.case_id in test_ids])
    out_of_domain = statistic(discover_cases(lesions).cases)
    assert out_of_domain > 1.5 * in_domain, (in_domain, out_of_domain)


def test_uncertainty_metrics_equal_direct_metric_calls_on_the_written_files(tmp_path):
    """The per-case AUROC, UEO and mean uncertainty, the mean-curve UEO and the Spearman ρ,
    against the metric functions called on the prediction and source files themselves."""
    import csv

    from vi_seg_jax.data.conventions import regions_from_classes
    from vi_seg_jax.evaluation import (
        PREDICTION_FILE,
        PredictionRun,
        evaluate_folder,
        prediction_record,
    )
    from vi_seg_jax.io.folders import write_json_atomic
    from vi_seg_jax.io.nifti import read_nifti, write_nifti
    from vi_seg_jax.metrics import (
        UEO_THRESHOLDS,
        best_uncertainty_error_overlap,
        error_detection_auroc,
        mean_uncertainty,
        spearman_correlation,
        uncertainty_error_overlap_curve,
    )

    data, pred = tmp_path / "data", tmp_path / "pred"
    write_dataset(data, num_cases=3, shape=(32, 32, 24), seed=5)
    cases = discover_cases(data).cases
    pred.mkdir()
    rng = np.random.default_rng(0)
    for k, case in enumerate(cases):
        truth = read_nifti(case.label)
        wt = regions_from_classes(case.convention.to_canonical(np.rint(truth.data).astype(int)))
        wt = wt[..., 0]
        # A prediction one voxel off along x, with errors flagged by higher uncertainty
        # (plus noise, more of it for later cases, so the cases' ranks differ).
        predicted = np.roll(wt, 1 + k, axis=0)
        noise = rng.integers(0, 70 + 15 * k, wt.shape)
        unc = np.clip(np.where(predicted != wt, 60, 0) + noise, 0, 100).astype(np.uint8)
        prob = np.where(predicted, 0.9, 0.05).astype(np.float32)
        kw = {"affine": truth.affine, "header": truth.header}
        seg = predicted.astype(np.uint8)
        write_nifti(pred / f"{case.case_id}_seg.nii.gz", seg, kind="label", **kw)
        write_nifti(pred / f"{case.case_id}_prob.nii.gz", prob, **kw)
        write_nifti(pred / f"{case.case_id}_unc_wt.nii.gz", unc, kind="label", **kw)
    record = prediction_record(
        checkpoint="hand-made",
        input_dir=data,
        step=0,
        task="wt",
        settings={"samples": 1, "window": [16, 16], "overlap": 0.25},
        devices=1,
        temperature={"wt": 1.0},
        cases=[case.case_id for case in cases],
    )
    write_json_atomic(pred / PREDICTION_FILE, record)
    out = tmp_path / "eval"
    summary = evaluate_folder(PredictionRun.read(pred), out, progress=False)

    with open(out / "cases.csv") as handle:
        rows = {row["case_id"]: row for row in csv.DictReader(handle)}
    with open(out / "ueo_curves.csv") as handle:
        curve_rows = {row["case_id"]: row for row in csv.DictReader(handle)}
    curves, uncertainties, dices = [], [], []
    for case in cases:
        t1 = read_nifti(case.images["t1"]).data
        brain = t1 > 0  # the QU-BraTS scorer's brain
        truth = read_nifti(case.label).data > 0  # any tumour label is whole tumour
        predicted = read_nifti(pred / f"{case.case_id}_seg.nii.gz").data > 0
        u = read_nifti(pred / f"{case.case_id}_unc_wt.nii.gz").data.astype(np.float64) / 100
        row = rows[case.case_id]
        auroc = error_detection_auroc(u, predicted, truth, mask=brain)
        curve = uncertainty_error_overlap_curve(u, predicted, truth, UEO_THRESHOLDS, mask=brain)
        mean_u = mean_uncertainty(u, brain)
        assert 0.5 < auroc < 1.0  # errors are flagged, through the noise
        assert float(row["wt_error_auroc"]) == pytest.approx(auroc, rel=1e-5)
        assert float(row["wt_ueo"]) == pytest.approx(np.max(curve), rel=1e-5)
        assert float(row["wt_mean_uncertainty"]) == pytest.approx(mean_u, rel=1e-5)
        written = [float(curve_rows[case.case_id][f"wt_ueo_{t:g}"]) for t in UEO_THRESHOLDS]
        np.testing.assert_allclose(written, curve, rtol=1e-5)
        curves.append(curve)
        uncertainties.append(mean_u)
        dices.append(float(row["wt_dice"]))
    for metric, values in (("mean_uncertainty", uncertainties), ("dice", dices)):
        assert summary["wt"][metric]["mean"] == pytest.approx(np.mean(values), rel=1e-5)
    over_cases = json.loads((out / "uncertainty.json").read_text())["wt"]
    best = best_uncertainty_error_overlap(np.array(curves), UEO_THRESHOLDS)
    assert over_cases["ueo_threshold"] == best.threshold
    assert over_cases["ueo"] == pytest.approx(best.ueo, rel=1e-9)
    rho = spearman_correlation(np.array(uncertainties), np.array(dices))
    assert over_cases["spearman_uncertainty_dice"] == pytest.approx(rho, abs=1e-9)
    assert over_cases["n"] == 3 and len(over_cases["ueo_curve"]) == len(UEO_THRESHOLDS)
    # The Markdown summary carries both tables.
    text = (out / "summary.md").read_text()
    assert "| error_auroc | ueo | mean_uncertainty |" in text and "Spearman" in text
