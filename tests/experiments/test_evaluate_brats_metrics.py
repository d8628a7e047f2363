"""`evaluate --brats-metrics`: the official BraTS-evaluation package's lesion-wise metrics.

The prediction folders are written by hand from the ground truth (a lesion dropped, a spurious
one added), so no model is trained. Each expected value comes from calling the package
directly, as its README shows, on the same files.
"""

import csv
import json
import math
import sys
import warnings

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from experiments import evaluate
from vi_seg_jax.data.conventions import BRATS_2023, regions_from_classes
from vi_seg_jax.data.discovery import discover_cases
from vi_seg_jax.data.synthetic import write_dataset
from vi_seg_jax.evaluation import METRICS, PREDICTION_FILE, prediction_record
from vi_seg_jax.io.folders import write_json_atomic
from vi_seg_jax.io.nifti import read_nifti, write_nifti
from vi_seg_jax.metrics import HD95_CAP, dice
from vi_seg_jax.task import get_task

# The columns and the package's result keys they promise to hold (brats_metrics docstring),
# spelt out here rather than imported so that a wrong key there fails: the matched lesions'
# means, then panoptic quality and the lesion counts.
COLUMNS = {"lesion_dice": "sq_dsc", "lesion_hd95": "sq_hd95", "lesion_nsd": "sq_nsd"}
COLUMNS |= {"lesion_pq": "pq_dsc", "lesion_tp": "tp", "lesion_fp": "fp", "lesion_fn": "fn"}


def _official(prediction, truth):
    """The package's README route: the bundled `gli` configuration, `evaluate_single_exam`."""
    from brats_evaluation import config_path, evaluate_single_exam
    from panoptica import Panoptica_Evaluator

    evaluator = Panoptica_Evaluator.load_from_config(str(config_path("gli")))
    with warnings.catch_warnings():
        # Its global NSD (not compared here) warns about its 0.5-voxel tolerance on every call.
        warnings.filterwarnings("ignore", "The threshold is set to 0.5")
        result = evaluate_single_exam(prediction, truth, "case", evaluator)
    assert "error" not in result, result
    return result


def _expected(result):
    values = {}
    for column, key in COLUMNS.items():
        value = float(result.get(key, math.nan))
        values[column] = HD95_CAP if math.isinf(value) else value
    return values


def _predicted_classes(classes, rng):
    """The truth grown one voxel along z, its smallest whole-tumour lesion missed, and a
    spurious edema blob (so distances depend on the z spacing and lesions are missed and
    spurious)."""
    grown = np.roll(classes, 1, axis=2)
    classes = np.where(classes > 0, classes, grown)
    components, count = ndimage.label(classes > 0)
    if count > 1:
        sizes = ndimage.sum(classes > 0, components, range(1, count + 1))
        classes[components == 1 + int(np.argmin(sizes))] = 0
    far = ~ndimage.binary_dilation(classes > 0, iterations=3)
    x, y, z = np.argwhere(far[2:-4, 2:-4, 2:-4])[rng.integers(far.sum() // 8)] + 2
    classes[x : x + 2, y : y + 2, z : z + 2] = 2
    return classes


def _write_prediction(data, out, task_name, seed=0):
    """A prediction folder as `experiments.predict` writes it, from perturbed truth."""
    rng = np.random.default_rng(seed)
    task = get_task(task_name)
    cases = discover_cases(data).cases
    out.mkdir(parents=True)
    for case in cases:
        truth = read_nifti(case.label)
        classes = case.convention.to_canonical(np.rint(truth.data).astype(np.int64))
        predicted = _predicted_classes(classes, rng)
        regions = regions_from_classes(predicted)[..., : len(task.regions)]
        seg = task.release_labels(task.labels(regions), case.convention)
        kw = {"affine": truth.affine, "header": truth.header}
        write_nifti(out / f"{case.case_id}_seg.nii.gz", seg, kind="label", **kw)
        write_nifti(out / f"{case.case_id}_prob.nii.gz", regions.astype(np.float32), **kw)
        for region in task.regions:
            unc = np.zeros(classes.shape, np.uint8)
            write_nifti(out / f"{case.case_id}_unc_{region}.nii.gz", unc, kind="label", **kw)
    record = prediction_record(
        checkpoint="hand-made",
        input_dir=data,
        step=0,
        task=task_name,
        settings={"samples": 1, "window": [16, 16, 16], "overlap": 0.5},
        devices=1,
        temperature=dict.fromkeys(task.regions, 1.0),
        cases=[case.case_id for case in cases],
    )
    write_json_atomic(out / PREDICTION_FILE, record)
    return {case.case_id: case for case in cases}


def _evaluate(pred, data, out, *extra):
    argv = ["--pred", str(pred), "--data-dir", str(data), "--out", str(out), "--no-progress"]
    assert evaluate.main([*argv, *extra]) == 0
    with open(out / "cases.csv") as handle:
        rows = {row["case_id"]: row for row in csv.DictReader(handle)}
    return rows, json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def isotropic_2023(tmp_path_factory):
    """BraTS 2023 labels on a 5 mm isotropic grid (240 x 240 x 155 mm / (48, 48, 31))."""
    data = tmp_path_factory.mktemp("brats2023") / "data"
    write_dataset(data, num_cases=2, layout="brats2023", shape=(48, 48, 31), seed=4)
    return data


def test_lesion_columns_equal_the_official_package_on_the_same_files(isotropic_2023, tmp_path):
    data = isotropic_2023
    cases = _write_prediction(data, tmp_path / "pred", "regions")
    rows, summary = _evaluate(tmp_path / "pred", data, tmp_path / "eval", "--brats-metrics")

    regions = ("wt", "tc", "et")
    metrics = (*METRICS, *COLUMNS)
    assert set(next(iter(rows.values()))) == {"case_id"} | {
        f"{r}_{m}" for r in regions for m in metrics
    }
    assert set(summary) == set(regions) and all(set(summary[r]) == set(metrics) for r in regions)
    counts = {"lesion_fp": 0, "lesion_fn": 0}
    for case_id, row in rows.items():
        official = _official(
            str(tmp_path / "pred" / f"{case_id}_seg.nii.gz"), str(cases[case_id].label)
        )
        for region in regions:
            for column, value in _expected(official[region]).items():
                got = float(row[f"{region}_{column}"])
                assert got == pytest.approx(value, rel=1e-5, nan_ok=True), (region, column)
            counts["lesion_fp"] += int(official["wt"]["fp"])
            counts["lesion_fn"] += int(official["wt"]["fn"])
    assert counts["lesion_fp"] > 0 and counts["lesion_fn"] > 0  # the perturbation took effect
    for region in regions:
        values = np.array([float(row[f"{region}_lesion_dice"]) for row in rows.values()])
        finite = values[~np.isnan(values)]
        assert summary[region]["lesion_dice"]["n"] == finite.size
        assert summary[region]["lesion_dice"]["mean"] == pytest.approx(finite.mean(), rel=1e-5)
    # The configuration it ran with is recorded, and is the bundled one.
    from brats_evaluation import config_path
    from panoptica import Panoptica_Evaluator

    recorded = Panoptica_Evaluator.load_from_config(str(tmp_path / "eval" / "brats_metrics.yaml"))
    bundled = Panoptica_Evaluator.load_from_config(str(config_path("gli")))
    groups = [
        sorted(str(type(e)._yaml_repr(e)["segmentation_class_groups"]).splitlines())
        for e in (recorded, bundled)
    ]
    assert groups[0] == groups[1] and any("[1, 2, 3]" in line for line in groups[0])
    assert "lesion_dice" in (tmp_path / "eval" / "summary.md").read_text()


def test_a_wt_prediction_gets_the_whole_tumour_row_only(isotropic_2023, tmp_path):
    data = isotropic_2023
    cases = _write_prediction(data, tmp_path / "pred", "wt")
    rows, summary = _evaluate(tmp_path / "pred", data, tmp_path / "eval", "--brats-metrics")
    assert set(summary) == {"wt"}
    for case_id, row in rows.items():
        assert set(row) == {"case_id"} | {f"wt_{m}" for m in (*METRICS, *COLUMNS)}
        seg = tmp_path / "pred" / f"{case_id}_seg.nii.gz"
        assert set(np.unique(np.asarray(nib.load(seg).dataobj))) <= {0, 1}
        official = _official(str(seg), str(cases[case_id].label))
        for column, value in _expected(official["wt"]).items():
            assert float(row[f"wt_{column}"]) == pytest.approx(value, rel=1e-5, nan_ok=True)
    # Without the flag: the other columns only, with the same values.
    plain, _ = _evaluate(tmp_path / "pred", data, tmp_path / "plain")
    for case_id, row in plain.items():
        assert row == {k: v for k, v in rows[case_id].items() if "lesion" not in k}
    assert not (tmp_path / "plain" / "brats_metrics.yaml").exists()


def test_brats2021_labels_score_as_gli_on_relabelled_files_with_the_true_spacing(tmp_path):
    """Labels 1/2/4 (no bundled configuration fits) on an anisotropic grid.

    Expected: the bundled `gli` configuration on the same files with ET relabelled 4 -> 3,
    given as nibabel images so that each axis keeps its own spacing.
    """
    data = tmp_path / "data"
    write_dataset(data, num_cases=1, layout="brats2021", shape=(32, 32, 24), seed=5)
    cases = _write_prediction(data, tmp_path / "pred", "regions", seed=1)
    rows, _ = _evaluate(tmp_path / "pred", data, tmp_path / "eval", "--brats-metrics")
    (case_id, case), row = next(iter(cases.items())), next(iter(rows.values()))
    assert row["case_id"] == case_id

    def relabelled(path):
        image = nib.load(path)
        labels = np.asarray(image.dataobj).astype(np.uint8)
        assert set(np.unique(labels)) <= {0, 1, 2, 4}
        labels[labels == 4] = 3
        return nib.Nifti1Image(labels, image.affine, image.header)

    spacing = nib.load(case.label).header.get_zooms()
    assert len(set(np.round(spacing, 3))) > 1  # anisotropic
    official = _official(
        relabelled(tmp_path / "pred" / f"{case_id}_seg.nii.gz"), relabelled(case.label)
    )
    for region in ("wt", "tc", "et"):
        for column, value in _expected(official[region]).items():
            got = float(row[f"{region}_{column}"])
            assert got == pytest.approx(value, rel=1e-5, nan_ok=True), (region, column)


def test_a_missed_lesion_lowers_panoptic_quality_not_the_matched_lesions_dice(tmp_path):
    """Two lesions, the smaller one missed, the larger one exact.

    As the package defines them: lesion-wise Dice (`sq_dsc`, its report's
    `lesionwise_dsc_mean`) averages the matched lesions only, so it is 1 and above the global
    Dice; the miss shows in the lesion counts and in the panoptic quality, which is below the
    global Dice.
    """
    from vi_seg_jax.brats_metrics import scorer_for

    truth = np.zeros((32, 32, 32), np.uint8)
    truth[4:12, 4:12, 4:12] = 2  # 512 voxels
    truth[20:24, 20:24, 20:24] = 2  # 64 voxels, missed
    prediction = truth.copy()
    prediction[20:24, 20:24, 20:24] = 0
    affine = np.eye(4)
    for name, labels in (("truth", truth), ("pred", prediction)):
        write_nifti(tmp_path / f"{name}.nii.gz", labels, affine=affine, kind="label")

    scorer = scorer_for(BRATS_2023, ("wt",))
    wt = scorer.score(tmp_path / "pred.nii.gz", tmp_path / "truth.nii.gz")["wt"]
    global_dice = dice(prediction > 0, truth > 0)
    assert global_dice == pytest.approx(2 * 512 / (2 * 512 + 64))
    assert (wt["lesion_tp"], wt["lesion_fp"], wt["lesion_fn"]) == (1, 0, 1)
    assert wt["lesion_dice"] == 1.0 > global_dice
    assert wt["lesion_pq"] == pytest.approx(1 / (1 + 0.5)) and wt["lesion_pq"] < global_dice
    assert wt["lesion_hd95"] == 0.0 and wt["lesion_nsd"] == 1.0
    # The package's own numbers, through its README route.
    official = _official(str(tmp_path / "pred.nii.gz"), str(tmp_path / "truth.nii.gz"))
    assert official["wt"]["global_bin_dsc"] == pytest.approx(global_dice)
    assert wt == pytest.approx(_expected(official["wt"]))


def test_without_the_package_evaluate_stops_with_one_line_and_exit_2(
    isotropic_2023, tmp_path, monkeypatch, capsys
):
    data = isotropic_2023
    _write_prediction(data, tmp_path / "pred", "wt")
    monkeypatch.setitem(sys.modules, "brats_evaluation", None)  # import fails
    argv = ["--pred", str(tmp_path / "pred"), "--data-dir", str(data)]
    out = tmp_path / "eval"
    assert evaluate.main([*argv, "--out", str(out), "--brats-metrics", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert 'pip install -e ".[brats]"' in err[0] and "BraTS-evaluation" in err[0]
    assert not out.exists()  # stopped before scoring anything
