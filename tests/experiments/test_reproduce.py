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
