"""The reproduction study end to end on tiny shapes: runs, tables beside the paper's numbers."""

import csv

import jax
import numpy as np
import pytest

from experiments import reproduce
from vi_seg_jax.data.synthetic import write_dataset


def test_dice_iou_table_has_every_backbone_and_size_beside_the_paper(tmp_path, monkeypatch):
    monkeypatch.setenv("VI_SEG_JAX_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    write_dataset(data, num_cases=4, shape=(32, 32, 24), seed=2)
    argv = ["--table", "dice-iou", "--out", str(tmp_path / "out"), "--data-dir", str(data)]
    argv += ["--backbones", "unet", "fcn", "--train-sizes", "1", "2", "--repeats", "1"]
    argv += ["--steps", "1", "--features", "4", "8", "--samples", "1", "--no-progress"]
    argv += ["--test-size", "1", "--validation-size", "1"]
    with jax.numpy_dtype_promotion("standard"):
        assert reproduce.main(argv) == 0
    tables = tmp_path / "out" / "tables"
    with open(tables / "dice_iou.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["backbone"], r["train_size"]) for r in rows} == {
        (b, s) for b in ("unet", "fcn") for s in ("1", "2")
    }
    # Each row is the Dice / IoU of its run's test prediction against the label file, both
    # counted here in NumPy (the predictor is seeded per case: the same labels again).
    dice = (tables / "dice.md").read_text().splitlines()
    iou = (tables / "iou.md").read_text().splitlines()
    assert dice[0] == "| backbone | train_size 1 | train_size 2 |"
    assert [line.split(" |")[0] for line in dice[2:]] == ["| unet", "| fcn"]
    for row in rows:
        workdir = tmp_path / "out" / "runs" / f"{row['backbone']}-n{row['train_size']}-r0"
        expected_dice, expected_iou = _recomputed_dice_iou(workdir, samples=1)
        assert float(row["dice"]) == pytest.approx(expected_dice, abs=1e-12)
        assert float(row["iou"]) == pytest.approx(expected_iou, abs=1e-12)
        # The tables' cells: 100 × mean ± std (runs) beside the paper's number.
        line = 2 + ["unet", "fcn"].index(row["backbone"])
        column = 1 + ["1", "2"].index(row["train_size"])
        for table, metric, value in ((dice, "dice", expected_dice), (iou, "iou", expected_iou)):
            paper = reproduce.PAPER[(metric, row["backbone"])].get(int(row["train_size"]))
            note = "" if paper is None else f" (paper {paper:.1f})"  # none for 1 or 2 cases
            cell = table[line].split(" | ")[column].strip(" |")
            assert cell == f"{100 * value:.1f} ± 0.0 (1){note}"
    _assert_png(tables / "dice_vs_train_size.png", width=650, height=400)


def _recomputed_dice_iou(workdir, samples):
    """Mean Dice and IoU over the run's test cases, from a fresh prediction with `samples`
    Monte Carlo samples (as the study's), counted in NumPy."""
    import nibabel as nib

    from experiments.studies import held_out_cases, predictor_for

    predictor = predictor_for(workdir, samples)
    dices, ious = [], []
    for case in held_out_cases(workdir):
        predicted = predictor.predict_case(case, progress=False).labels > 0
        truth = np.asarray(nib.load(case.label).dataobj) > 0  # any BraTS tumour label
        both, either = np.sum(predicted & truth), np.sum(predicted | truth)
        dices.append(2 * both / (predicted.sum() + truth.sum()) if either else 1.0)
        ious.append(both / either if either else 1.0)
    assert dices  # a test case was scored
    return float(np.mean(dices)), float(np.mean(ious))


def _assert_png(path, *, width, height):
    """A PNG of the given size (header) that decodes to an image that is not blank."""
    import struct

    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (width, height)
    pixels = imread(path)
    assert pixels.shape[:2] == (height, width)
    assert np.ptp(pixels[..., :3]) > 0.5  # drawn on: dark lines on white


def test_paper_numbers_sit_beside_the_cells():
    table = reproduce.mean_std_table(
        [{"backbone": "unet", "train_size": 5, "dice": 0.5}],
        row_key="backbone",
        column_key="train_size",
        metric="dice",
        reference=lambda b, n: reproduce.PAPER[("dice", b)].get(n),
    )
    assert table.splitlines()[-1] == "| unet | 50.0 ± 0.0 (1) (paper 53.1) |"


def test_the_methods_table_needs_a_prior_for_dwp(capsys):
    with pytest.raises(SystemExit) as exit_info:
        reproduce.parse_args(["--table", "methods", "--out", "x"])
    assert exit_info.value.code == 2
    assert "--methods dwp needs --prior-dir" in capsys.readouterr().err.splitlines()[-1]


def test_methods_table_has_tta_rows_that_reuse_the_trained_runs(tmp_path, monkeypatch):
    import json

    from vi_seg_jax.io.nifti import read_nifti

    monkeypatch.setenv("VI_SEG_JAX_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    write_dataset(data, num_cases=4, shape=(32, 32, 24), seed=2)
    out = tmp_path / "out"
    argv = ["--table", "methods", "--out", str(out), "--data-dir", str(data)]
    argv += ["--methods", "deterministic", "vi", "--method-train-size", "1", "--steps", "1"]
    argv += ["--features", "4", "8", "--samples", "1", "--no-progress"]
    argv += ["--test-size", "1", "--validation-size", "1"]
    with jax.numpy_dtype_promotion("standard"):
        assert reproduce.main(argv) == 0
    tables = out / "tables"
    with open(tables / "methods.csv") as handle:
        rows = list(csv.DictReader(handle))
    names = ["deterministic", "deterministic + TTA", "vi", "vi + TTA"]
    assert [r["method"] for r in rows] == names
    lines = (tables / "methods.md").read_text().splitlines()
    assert [line.split(" |")[0] for line in lines[2:]] == [f"| {n}" for n in names]
    # Two trained runs only: the TTA rows predict the same runs again, with flips.
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        "method-deterministic-n1",
        "method-vi-n1",
    ]
    for method in ("deterministic", "vi"):
        plain = json.loads((out / "predictions" / method / "prediction.json").read_text())
        tta = json.loads((out / "predictions" / f"{method}-tta" / "prediction.json").read_text())
        assert plain["tta"] == "none" and tta["tta"] == "flips"
        assert {k: v for k, v in tta.items() if k != "tta"} == {
            k: v for k, v in plain.items() if k != "tta"
        }
    # The deterministic network with flips (2D: 4 mirrorings): one network, so no epistemic
    # part; the flips' spread is the TTA map, and the three parts add up to p̄(1 − p̄).
    folder = out / "predictions" / "deterministic-tta"
    case_id = json.loads((folder / "prediction.json").read_text())["cases"][0]

    def volume(suffix):
        return read_nifti(folder / f"{case_id}_{suffix}.nii.gz").data.astype(np.float64)

    assert not (out / "predictions" / "deterministic" / f"{case_id}_tta.nii.gz").exists()
    calibrated = (folder / f"{case_id}_prob_uncalibrated.nii.gz").exists()
    mean = volume("prob_uncalibrated" if calibrated else "prob")  # p̄
    np.testing.assert_array_equal(volume("epistemic"), 0.0)
    assert np.max(volume("tta")) > 1e-6
    np.testing.assert_allclose(volume("aleatoric") + volume("tta"), mean * (1 - mean), atol=2e-6)
