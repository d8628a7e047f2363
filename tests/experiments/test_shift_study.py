"""The graded-shift study end to end on tiny shapes: files, numbers, reuse, bad flags."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import shift_study
from vi_seg_jax.data.synthetic import SHIFT_KINDS, write_dataset
from vi_seg_jax.metrics import UEO_THRESHOLDS, best_uncertainty_error_overlap, spearman_correlation

ENTRIES = ["deterministic", "deterministic + TTA", "mc_dropout"]
FOLDERS = {"deterministic": "deterministic", "deterministic + TTA": "deterministic-tta"}
FOLDERS["mc_dropout"] = "mc_dropout"


def _argv(data, out, *extra):
    argv = ["--out", str(out), "--data-dir", str(data), "--methods", "deterministic"]
    argv += ["mc_dropout", "--repeats", "1", "--kinds", "scanner", "--levels", "0", "3"]
    argv += ["--test-cases", "2", "--train-size", "1", "--validation-size", "1"]
    argv += ["--steps", "1", "--features", "4", "8", "--samples", "2", *extra]
    return argv


def _read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def _recomputed(evaluation):
    """A cell's numbers from its per-case files alone (cases.csv, ueo_curves.csv)."""
    cases = _read_csv(evaluation / "cases.csv")
    curves = _read_csv(evaluation / "ueo_curves.csv")
    assert [c["case_id"] for c in curves] == [c["case_id"] for c in cases]
    column = {m: np.array([float(c[f"wt_{m}"]) for c in cases]) for m in shift_study.CASE_MEANS}
    cell = {m: float(np.mean(values)) for m, values in column.items()}
    grid = np.array([[float(c[f"wt_ueo_{t:g}"]) for t in UEO_THRESHOLDS] for c in curves])
    best = best_uncertainty_error_overlap(grid, UEO_THRESHOLDS)
    cell |= {"ueo": best.ueo, "ueo_threshold": best.threshold, "cases": len(cases)}
    cell["spearman"] = spearman_correlation(column["mean_uncertainty"], column["dice"])
    return cell


def test_shift_study_writes_cells_equal_to_the_evaluations_and_reuses_them(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("VI_SEG_JAX_CACHE", str(tmp_path / "cache"))
    data, out = tmp_path / "data", tmp_path / "out"
    write_dataset(data, num_cases=3, shape=(32, 32, 24), seed=2)
    with jax.numpy_dtype_promotion("standard"):
        assert shift_study.main(_argv(data, out)) == 0
    steps = capsys.readouterr().err.splitlines()
    assert any(line.startswith("shift_study: trained mc_dropout, repeat 0") for line in steps)
    assert any("deterministic + TTA, repeat 0, scanner-3: scored" in line for line in steps)

    # Test sets: 2 cases each on the training grid, a seed other than the training data's.
    sets = sorted(p.name for p in (out / "testsets").iterdir())
    assert sets == ["level0", "scanner-3"]
    from vi_seg_jax.data.discovery import discover_cases
    from vi_seg_jax.io.nifti import read_nifti

    trained = [read_nifti(c.images["t1"]).data for c in discover_cases(data).cases]
    for name in sets:
        cases = discover_cases(out / "testsets" / name).cases
        assert len(cases) == 2
        for case in cases:
            t1 = read_nifti(case.images["t1"]).data
            assert t1.shape == (32, 32, 24)
            assert not any(np.array_equal(t1, other) for other in trained)
    # Two runs (the TTA row predicts the deterministic run again).
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["deterministic-r0", "mc_dropout-r0"]
    # No posterior among them: the posterior table is its header only.
    assert (out / "tables" / "posterior.md").read_text().count("\n") == 2

    # cells.csv: one row per method × kind × level × repeat, each the recomputation of its
    # evaluation's per-case files.
    rows = _read_csv(out / "tables" / "cells.csv")
    assert [(r["method"], r["kind"], r["level"], r["repeat"]) for r in rows] == [
        (m, "scanner", level, "0") for m in ENTRIES for level in ("0", "3")
    ]
    assert list(rows[0]) == ["method", "kind", "level", "repeat", "cases", *shift_study.CASE_MEANS,
                             "ueo", "ueo_threshold", "spearman"]  # fmt: skip
    for row in rows:
        name = "level0" if row["level"] == "0" else "scanner-3"
        evaluation = out / "evaluation" / f"{FOLDERS[row['method']]}-r0" / name
        expected = _recomputed(evaluation)
        for key, value in expected.items():
            assert float(row[key]) == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), key
        assert 0.0 <= float(row["error_auroc"]) <= 1.0 and 0.0 <= float(row["ueo"]) <= 1.0
    # The Markdown tables: mean ± std (repeats) per method × level, per kind.
    text = (out / "tables" / "shift.md").read_text()
    assert "## scanner" in text and "## contrast" not in text
    dice_table = text.split("### Dice (%)")[1].split("###")[0].strip().splitlines()
    assert dice_table[0] == "| method | level 0 | level 3 |"
    assert [line.split(" |")[0] for line in dice_table[2:]] == [f"| {m}" for m in ENTRIES]
    for row in rows:
        cell = dice_table[2 + ENTRIES.index(row["method"])].split(" | ")[1 + (row["level"] == "3")]
        assert cell.strip(" |") == f"{100 * float(row['dice']):.1f} ± 0.0 (1)"
    assert "Spearman" in text and "AUROC" in text and "mean uncertainty" in text
    assert (out / "tables" / "shift_scanner.png").stat().st_size > 10_000
    assert json.loads((out / "study.json").read_text())["test_shape"] == [32, 32, 24]

    # A rerun reuses everything: nothing trained, predicted or evaluated again.
    def refuse(*args, **kwargs):
        raise AssertionError("redone")

    monkeypatch.setattr("vi_seg_jax.train.loop.train_and_evaluate", refuse)
    monkeypatch.setattr("vi_seg_jax.predict.predict_folder", refuse)
    monkeypatch.setattr("vi_seg_jax.evaluation.evaluate_folder", refuse)
    watched = [*(out / "runs").rglob("*"), *(out / "predictions").rglob("*")]
    watched += [*(out / "evaluation").rglob("*"), *(out / "testsets").rglob("*")]
    mtimes = {p: p.stat().st_mtime_ns for p in watched if p.is_file()}
    before = (out / "tables" / "cells.csv").read_text()
    with jax.numpy_dtype_promotion("standard"):
        assert shift_study.main(_argv(data, out)) == 0
    assert (out / "tables" / "cells.csv").read_text() == before
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes

    # An interrupted study continues: a missing evaluation is redone, and only it.
    monkeypatch.undo()
    monkeypatch.setenv("VI_SEG_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("vi_seg_jax.train.loop.train_and_evaluate", refuse)
    monkeypatch.setattr("vi_seg_jax.predict.predict_folder", refuse)
    (out / "evaluation" / "mc_dropout-r0" / "scanner-3" / "uncertainty.json").unlink()
    with jax.numpy_dtype_promotion("standard"):
        assert shift_study.main(_argv(data, out, "--no-progress")) == 0
    assert (out / "tables" / "cells.csv").read_text() == before

    # Other settings in the same --out: one line, exit code 2, before any work.
    result = subprocess.run(
        [sys.executable, "-m", "experiments.shift_study", *_argv(data, out, "--test-cases", "3")],
        capture_output=True,
        text=True,
        env={**os.environ, "VI_SEG_JAX_CACHE": str(tmp_path / "cache")},
        cwd=Path(__file__).parents[2],
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "test_cases 2 (now 3)" in result.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--levels", "4"], "argument --levels: invalid choice: 4"),
        (["--kinds", "weather"], "argument --kinds: invalid choice: 'weather'"),
        (["--methods", "dwp"], "--methods dwp needs --prior-dir"),
        (["--test-seed", "0"], "--test-seed 0 is the embedded training data's seed"),
        (["--test-cases", "0"], "--test-cases must be >= 1"),
    ],
)
def test_bad_flags_stop_with_one_error_line_and_exit_code_2(extra, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        shift_study.parse_args(["--out", "x", *extra])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("python -m experiments.shift_study: error: ") and message in error


def test_level_zero_is_one_shared_test_set_and_the_kinds_are_the_generators():
    assert tuple(shift_study.SHIFT_KINDS) == SHIFT_KINDS
    args = shift_study.parse_args(["--out", "x", "--kinds", "anatomy", "scanner"])
    assert shift_study.shifted_sets(args) == [("level0", None, 0)] + [
        (f"{k}-{level}", k, level) for k in ("anatomy", "scanner") for level in (1, 2, 3)
    ]
    assert args.methods == ["deterministic", "mc_dropout", "ensemble", "vi"]
    rows = [{"method": "vi", "kind": None, "level": 0, "repeat": 0}]
    rows.append({"method": "vi", "kind": "scanner", "level": 2, "repeat": 0})
    assert [(r["kind"], r["level"]) for r in shift_study.expand_level0(rows, args.kinds)] == [
        ("anatomy", 0),
        ("scanner", 0),
        ("scanner", 2),
    ]


def test_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit) as exit_info:
        shift_study.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: False)" not in text
    options = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    for entry in (" ".join(o.split()) for o in options if o.strip()):
        assert len(re.findall(r"\bdefault\b", entry)) <= 1, entry


def test_the_vi_study_settings_reach_only_the_posteriors_runs():
    args = shift_study.parse_args(["--out", "x", "--kl-weight", "0.1", "--init-log-var", "-8"])
    args.test_size = 0
    vi = shift_study._run_config(args, "vi", 0)
    assert vi.prior.kl_weight == 0.1 and vi.method.guide.init_log_var == -8.0
    deterministic = shift_study._run_config(args, "deterministic", 0)
    assert deterministic.prior.kl_weight == 1.0
    assert deterministic.method.guide.init_log_var != -8.0
    plain = shift_study.parse_args(["--out", "x"])
    plain.test_size = 0
    assert shift_study._run_config(plain, "vi", 0).prior.kl_weight == 1.0
