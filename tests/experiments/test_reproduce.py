"""The reproduction study end to end on tiny shapes: runs, tables beside the paper's numbers."""

import csv

import jax
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
    assert all(0.0 <= float(r["dice"]) <= 1.0 and 0.0 <= float(r["iou"]) <= 1.0 for r in rows)
    dice = (tables / "dice.md").read_text().splitlines()
    assert dice[0] == "| backbone | train_size 1 | train_size 2 |"
    assert [line.split(" |")[0] for line in dice[2:]] == ["| unet", "| fcn"]
    assert (tables / "iou.md").exists() and (tables / "dice_vs_train_size.png").exists()


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
