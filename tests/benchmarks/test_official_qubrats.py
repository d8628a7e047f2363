"""`benchmarks.official_qubrats` against a stand-in for the official scorer (no pandas needed).

The stand-in takes the official script's flags, checks what the checker passes it (the
prediction's maps, the dataset's ground truth and T1, `-n 40 -a`) and writes a CSV in the
official format with the values the test gives it; the files themselves are never read.
"""

import csv
import json
import sys
import textwrap

import numpy as np
import pytest

from benchmarks import official_qubrats

CASES = ("BraTS2021_00000", "BraTS2021_00001")
REGIONS = ("wt", "tc", "et")
AUCS = ("dice_auc", "ftp_auc", "ftn_auc")
MODALITY_FILES = ("t1", "t1ce", "t2", "flair")

STAND_IN = textwrap.dedent(
    """\
    import argparse, csv, json, pathlib, sys

    parser = argparse.ArgumentParser()
    for short, long in [("-s", "--segmentation"), ("-w", "--whole"), ("-c", "--core"),
                        ("-e", "--enhance"), ("-r", "--ground_truth"), ("-m", "--brain_mask"),
                        ("-o", "--output_file")]:
        parser.add_argument(short, long, required=True)
    parser.add_argument("-n", "--num_points", type=int, default=40)
    parser.add_argument("-a", "--return_auc", action="store_true")
    args = parser.parse_args()
    values = json.loads((pathlib.Path(__file__).parent / "official.json").read_text())
    if values.get("fail"):
        sys.exit("Traceback: the scorer broke")
    case = pathlib.Path(args.segmentation).name[: -len("_seg.nii.gz")]
    paths = {"whole": "unc_wt", "core": "unc_tc", "enhance": "unc_et"}
    for flag, suffix in paths.items():
        assert getattr(args, flag).endswith(f"{case}_{suffix}.nii.gz"), (flag, case)
    truth, t1 = pathlib.Path(args.ground_truth), pathlib.Path(args.brain_mask)
    assert truth.name == f"{case}_seg.nii.gz" and truth.parent.name == case, truth
    assert t1.name == f"{case}_t1.nii.gz" and t1.parent == truth.parent, t1
    assert args.num_points == 40 and args.return_auc
    with open(args.output_file + ".csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["TUMOR_TYPE", "DICE_AUC", "FTP_RATIO_AUC", "FTN_RATIO_AUC"])
        for region in ("WT", "TC", "ET"):
            writer.writerow([region, *(repr(v) for v in values[case][region])])
    print("Total Analysis Time: 0.00")
    """
)


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


@pytest.fixture
def setup(tmp_path):
    """A BraTS 2021 dataset, a regions prediction folder and its cases.csv (empty NIfTIs)."""
    data, pred, evaluation = tmp_path / "data", tmp_path / "pred", tmp_path / "eval"
    for case in CASES:
        for name in (*MODALITY_FILES, "seg"):
            _touch(data / case / f"{case}_{name}.nii.gz")
        for name in ("seg", "unc_wt", "unc_tc", "unc_et", "prob"):
            _touch(pred / f"{case}_{name}.nii.gz")
    record = {
        "input": str(data),
        "task": "regions",
        "temperature": dict.fromkeys(REGIONS, 1.0),
        "cases": list(CASES),
    }
    (pred / "prediction.json").write_text(json.dumps(record))
    rng = np.random.default_rng(0)
    ours = {c: {r: rng.uniform(0.0, 1.0, len(AUCS)).tolist() for r in REGIONS} for c in CASES}
    evaluation.mkdir()
    with open(evaluation / "cases.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        columns = [f"{r}_{m}" for r in REGIONS for m in ("dice", *(f"qubrats_{a}" for a in AUCS))]
        writer.writerow(["case_id", *columns])
        for case in CASES:
            cells = [v for r in REGIONS for v in [0.5, *ours[case][r]]]
            writer.writerow([case, *(f"{v:.6g}" for v in cells)])
    scorer = tmp_path / "scorer" / "BraTS_Seg_Uncertainty.py"
    scorer.parent.mkdir()
    scorer.write_text(STAND_IN)
    argv = ["--scorer", str(scorer), "--python", sys.executable]
    argv += ["--pred", str(pred), "--eval", str(evaluation)]
    return {"argv": argv, "ours": ours, "scorer": scorer, "tmp": tmp_path}


def _official(setup, perturb=None, fail=False):
    """The stand-in's values: ours at full precision, one (case, region, auc) shifted."""
    values = {
        case: {region.upper(): list(v) for region, v in by_region.items()}
        for case, by_region in setup["ours"].items()
    }
    if perturb is not None:
        (case, region, auc), shift = perturb
        values[case][region.upper()][AUCS.index(auc)] += shift
    (setup["scorer"].parent / "official.json").write_text(json.dumps({**values, "fail": fail}))


def _check(setup, capsys, *extra):
    status = official_qubrats.cli([*setup["argv"], *extra])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return status, (json.loads(lines[0]) if len(lines) == 1 else None), captured.err


def test_agreement(setup, capsys):
    _official(setup)
    keep = setup["tmp"] / "official"
    status, record, _ = _check(setup, capsys, "--jobs", "2", "--keep", str(keep))
    assert status == 0 and record["agree_to_1e-4"] is True
    assert record["cases"] == len(CASES) and record["num_points"] == 40
    assert record["scorer_numpy"] == np.__version__
    assert set(record["max_abs_diff"]) == set(REGIONS)
    for by_auc in record["max_abs_diff"].values():
        assert set(by_auc) == set(AUCS)
        # Only the 6 significant digits of cases.csv differ.
        assert all(0.0 <= d < 1e-6 for d in by_auc.values())
    assert sorted(p.name for p in keep.glob("*.csv")) == [f"{c}.csv" for c in CASES]


def test_disagreement(setup, capsys):
    _official(setup, perturb=((CASES[1], "tc", "ftp_auc"), 3e-4))
    status, record, _ = _check(setup, capsys)
    assert status == 1 and record["agree_to_1e-4"] is False
    assert record["max_abs_diff"]["tc"]["ftp_auc"] == pytest.approx(3e-4, abs=1e-6)
    assert record["max_abs_diff"]["wt"]["ftp_auc"] < 1e-6
    worst = record["worst"]
    assert (worst["case"], worst["region"], worst["auc"]) == (CASES[1], "tc", "ftp_auc")
    assert worst["official"] - worst["ours"] == pytest.approx(3e-4, abs=1e-6)


def test_just_below_the_tolerance_agrees(setup, capsys):
    _official(setup, perturb=((CASES[0], "et", "dice_auc"), -9e-5))
    status, record, _ = _check(setup, capsys)
    assert status == 0 and record["agree_to_1e-4"] is True


def _one_line_error(setup, capsys, *extra):
    status, record, err = _check(setup, capsys, *extra)
    assert status == 2 and record is None
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize(
    "missing, named",
    [
        ("pred/BraTS2021_00001_unc_et.nii.gz", "BraTS2021_00001_unc_et.nii.gz"),
        ("eval/cases.csv", "cases.csv"),
        ("pred/prediction.json", "prediction.json"),
        ("data/BraTS2021_00000/BraTS2021_00000_t1.nii.gz", "BraTS2021_00000_t1.nii.gz"),
        ("scorer/BraTS_Seg_Uncertainty.py", "BraTS_Seg_Uncertainty.py"),
    ],
)
def test_missing_file_is_one_line(setup, capsys, missing, named):
    _official(setup)
    (setup["tmp"] / missing).unlink()
    assert named in _one_line_error(setup, capsys)


def test_missing_ground_truth_and_column(setup, capsys):
    _official(setup)
    (setup["tmp"] / "data" / CASES[0] / f"{CASES[0]}_seg.nii.gz").unlink()
    line = _one_line_error(setup, capsys)
    assert CASES[0] in line and "ground truth" in line
    _touch(setup["tmp"] / "data" / CASES[0] / f"{CASES[0]}_seg.nii.gz")
    path = setup["tmp"] / "eval" / "cases.csv"
    path.write_text(path.read_text().replace("et_qubrats_ftn_auc", "et_other"))
    assert "et_qubrats_ftn_auc" in _one_line_error(setup, capsys)


def test_failing_scorer_and_wrong_inputs(setup, capsys):
    _official(setup, fail=True)
    assert "the scorer broke" in _one_line_error(setup, capsys)
    _official(setup)
    not_python = setup["tmp"] / "python"
    not_python.write_text("")
    argv = [a if a != sys.executable else str(not_python) for a in setup["argv"]]
    assert official_qubrats.cli(argv) == 2
    assert "not an executable" in capsys.readouterr().err
    record = json.loads((setup["tmp"] / "pred" / "prediction.json").read_text())
    (setup["tmp"] / "pred" / "prediction.json").write_text(json.dumps({**record, "task": "wt"}))
    assert "'regions' model" in _one_line_error(setup, capsys)


def test_refuses_a_dataset_without_label_4(setup, capsys, tmp_path):
    _official(setup)
    data = tmp_path / "brats2023"
    for case in ("BraTS-GLI-00000-000",):
        for name in ("t1n", "t1c", "t2w", "t2f", "seg"):
            _touch(data / case / f"{case}-{name}.nii.gz")
    line = _one_line_error(setup, capsys, "--data-dir", str(data))
    assert "brats2023" in line and "[0, 1, 2, 4]" in line
