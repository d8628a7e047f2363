"""The transfer study: every variant's configuration, and source → prior → target → tables."""

import csv
from pathlib import Path

import jax
import pytest

from experiments import transfer
from tests.experiments.test_reproduce import _assert_png, _recomputed_dice_iou
from vi_seg_jax.data.synthetic import write_dataset


def test_each_variant_trains_what_the_dwp_study_compares():
    args = transfer.parse_args(["--out", "study"])
    prior = Path("study/prior")
    configs = {v: transfer.target_config(args, v, 5, 1, prior) for v in transfer.VARIANTS}
    assert {v: c.method.method for v, c in configs.items()} == {
        "RI": "deterministic",
        "PR": "deterministic",
        "PRf": "deterministic",
        "VI": "vi",
        "DWP": "vi",
        "DWP-E": "vi",
    }
    assert {v for v, c in configs.items() if c.optimizer.init_from} == {"PR", "PRf"}
    assert configs["PR"].optimizer.init_from == str(
        (Path("study/prior.sources") / "seed0").absolute()
    )
    assert {v for v, c in configs.items() if c.optimizer.frozen_layers} == {"PRf"}
    assert {v for v, c in configs.items() if c.prior.kind == "dwp"} == {"DWP", "DWP-E"}
    assert {v for v, c in configs.items() if c.prior.train_encoder} == {"DWP-E"}
    assert configs["DWP"].method.guide.init_log_var == -10.0
    for config in configs.values():  # the same target data and budget for every variant
        assert (config.data.train_size, config.data.train_repeat, config.seed) == (5, 1, 1)
        assert config.data == configs["RI"].data and config.schedule == configs["RI"].schedule


def test_the_study_runs_end_to_end_and_writes_its_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("VI_SEG_JAX_CACHE", str(tmp_path / "cache"))
    source, target = tmp_path / "lesions", tmp_path / "tumours"
    write_dataset(source, num_cases=3, domain="lesions", shape=(64, 64, 16), seed=6)
    write_dataset(target, num_cases=3, shape=(64, 64, 16), seed=1)
    out = tmp_path / "transfer"
    argv = ["--out", str(out), "--data-dir", str(target), "--source-data-dir", str(source)]
    argv += ["--features", "4", "8", "8", "16", "--train-sizes", "1", "--steps", "2"]
    argv += ["--test-size", "1", "--validation-size", "1", "--samples", "1"]
    argv += ["--source-steps", "2", "--vae-steps", "10", "--no-progress"]
    # The two variants with the most parts: source weights with frozen layers, and a prior
    # whose encoders train.
    argv += ["--variants", "PRf", "DWP-E"]
    with jax.numpy_dtype_promotion("standard"):
        assert transfer.main(argv) == 0

    assert (out / "prior" / "manifest.json").is_file()
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["variant"], r["train_size"]) for r in rows] == [("PRf", "1"), ("DWP-E", "1")]
    # Each row is the Dice / IoU of its run's test prediction against the label file, counted
    # here in NumPy; the tables show them as 100 × mean ± std (runs).
    dice = (out / "dice.md").read_text().splitlines()
    iou = (out / "iou.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in dice[2:]] == ["PRf", "DWP-E"]
    for line, row in enumerate(rows, start=2):
        workdir = out / "runs" / f"{row['variant']}-n1-r0"
        expected_dice, expected_iou = _recomputed_dice_iou(workdir, samples=1)
        assert float(row["dice"]) == pytest.approx(expected_dice, abs=1e-12)
        assert float(row["iou"]) == pytest.approx(expected_iou, abs=1e-12)
        assert dice[line] == f"| {row['variant']} | {100 * expected_dice:.1f} ± 0.0 (1) |"
        assert iou[line] == f"| {row['variant']} | {100 * expected_iou:.1f} ± 0.0 (1) |"
    _assert_png(out / "dice_vs_train_size.png", width=650, height=400)
