"""Graded distribution shift: does each method's uncertainty rise as its Dice falls?

    python -m experiments.shift_study --out shift/                  # quick: 2D, CPU, ~2 h
    python -m experiments.shift_study --methods vi ensemble --kinds scanner --repeats 1 \\
        --out shift/
    python -m experiments.shift_study --preset paper --data-dir DATA --out shift/   # a GPU

Test sets: `--test-cases` synthetic cases (default 10) written with `--test-seed`, a seed
other than the training data's (the embedded dataset's is 0), so that no test case was ever
trained on; one folder per kind × level of `docs/shift.md` (`scanner`, `contrast`,
`anatomy`; levels 1-3), and one shared level-0 folder: the same cases unshifted. They are
written on the training data's grid (`--test-shape` to choose another). With real data in
`--data-dir` the test sets are still synthetic, so that level 0 is itself a domain shift;
train on a synthetic `--data-dir` (`experiments.make_data`) for a clean level 0.

Runs: each method (`--methods`: the deterministic network, MC dropout, a deep ensemble,
N(0, 1) VI and, with `--prior-dir`, the deep weight prior) is trained once per repeat
(`--repeats`, default 3; seed and draw of the training cases = the repeat) on the unshifted
training data, the embedded synthetic dataset or `--data-dir`, with the configuration of
`experiments.reproduce --table methods` (quick: 2D U-Net, 64² patches, 150 steps; paper: the
3D setup for a GPU). Every run is predicted on every test set with `--samples` Monte Carlo
samples, and the deterministic and VI runs a second time with test-time flips (`+ TTA`), as
in the methods table; then evaluated (`vi_seg_jax.evaluation.evaluate_folder`).

Writes, under `--out`:

- `tables/cells.csv`: one row per method × kind × level × repeat (level 0 repeated under
  each kind): whole-tumour Dice, ECE, Brier, NLL, QU-BraTS score, error-detection AUROC,
  UEO at the best mean threshold and that threshold, mean uncertainty in the brain (the
  binary entropy in bits, 0-1), and the Spearman ρ between the cases' mean uncertainty and
  Dice; the means over the test cases of each cell's `summary.json` and `uncertainty.json`;
- `tables/shift.md`: per kind, mean ± std over the repeats per method × level of Dice (%),
  mean uncertainty (× 100, the `_unc` maps' scale), AUROC and Spearman ρ;
- `tables/shift_<kind>.png`: Dice and mean uncertainty against the level, one line per
  method, error bars = std over the repeats;
- `testsets/`, `runs/`, `predictions/`, `evaluation/`: the data, runs, prediction folders
  and per-case evaluations behind each cell; `study.json`: the settings.

A rerun reuses every finished test set, run, prediction and evaluation (a killed run
resumes from its checkpoint, a killed prediction keeps its finished cases), so an
interrupted study continues where it stopped; `--out` refuses settings that differ from
those recorded in its `study.json`. A rerun with more methods, kinds, levels or repeats
trains and predicts only what is new; the tables show what the command asked for.

Cost (quick preset, defaults, a shared 2-core CPU): per repeat about 8 minutes of training
(the 5-member ensemble half of it) and 35 of prediction and evaluation (10 test sets × 6
predictors × 10 cases; `vi + TTA`, 40 network passes per case, half of it), so about 2 hours
for 3 repeats; `--samples 5` or `--repeats 2` take it to about 1.5 hours, `--repeats 1` to
45 minutes. About 2 GB on disk, mostly the prediction folders.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from experiments.common import make_parser, run_cli
from experiments.configs import PRESETS, with_overrides
from experiments.reproduce import METHODS, TTA_METHODS, run_config
from experiments.studies import mean_std_table, predictor_for, train_or_reuse, write_csv
from vi_seg_jax.data.default import DefaultDataset
from vi_seg_jax.data.synthetic import MAX_SHIFT_LEVEL, SHIFT_KINDS
from vi_seg_jax.io.folders import write_text_atomic
from vi_seg_jax.methods import resolve_method

LEVELS = tuple(range(MAX_SHIFT_LEVEL + 1))
DEFAULT_METHODS = tuple(m for m in METHODS if m != "dwp")  # dwp needs --prior-dir
REGION = "wt"  # every task has the whole tumour
# cells.csv's metrics: the per-case means of summary.json, then uncertainty.json's.
CASE_MEANS = (
    "dice",
    "ece",
    "brier",
    "nll",
    "qubrats_score",
    "error_auroc",
    "mean_uncertainty",
)
OVER_CASES = {
    "ueo": "ueo",
    "ueo_threshold": "ueo_threshold",
    "spearman": "spearman_uncertainty_dice",
}
# shift.md: (metric, heading, scale, decimals).
TABLES = (
    ("dice", "Dice (%)", 100.0, 1),
    ("mean_uncertainty", "mean uncertainty in the brain (× 100: the `_unc` maps' 0-100)", 100.0, 2),
    ("error_auroc", "voxel error-detection AUROC", 1.0, 3),
    ("spearman", "Spearman ρ (case mean uncertainty, case Dice; −1 is best)", 1.0, 2),
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = make_parser("experiments.shift_study", __doc__)
    add = parser.add_argument
    add("--out", required=True, type=Path, help="output folder (tables/ and the rest inside)")
    add("--preset", default="quick", choices=PRESETS, help="quick: 2D, CPU; paper: 3D, GPU")
    add("--data-dir", type=Path, help="unshifted training data (default: embedded synthetic)")
    add("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS), help="methods")
    add("--prior-dir", type=Path, help="deep weight prior folder (for --methods dwp)")
    add("--kinds", nargs="+", choices=SHIFT_KINDS, default=list(SHIFT_KINDS), help="shifts")
    add("--levels", nargs="+", type=int, choices=LEVELS, default=list(LEVELS), help="levels")
    add("--repeats", type=int, default=3, help="trainings per method (seeds 0 .. R-1)")
    add("--train-size", type=int, default=20, help="training cases per run")
    add("--validation-size", type=int, default=5, help="validation cases (checkpoint, T)")
    add("--steps", type=int, help="training steps per run (preset default)")
    add("--features", type=int, nargs="+", help="channels per level (preset default)")
    add("--test-cases", type=int, default=10, help="cases per test set")
    add("--test-seed", type=int, default=1, help="seed of the test cases (not the training's)")
    add("--test-shape", type=int, nargs=3, help="test grid (default: the training data's)")
    add("--samples", type=int, default=10, help="Monte Carlo samples at test time")
    add(
        "--kl-weight",
        type=float,
        help="VI and DWP runs: weight of the KL term (below 1: a tempered posterior; default: "
        "the preset's 1)",
    )
    add(
        "--init-log-var",
        type=float,
        help="VI and DWP runs: initial posterior log-variance (default: the preset's)",
    )
    add("--no-progress", action="store_true", help="no line per step")
    args = parser.parse_args(argv)
    for flag in ("repeats", "train_size", "validation_size", "test_cases", "samples"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.test_shape is not None and min(args.test_shape) < 8:
        parser.error(f"--test-shape sizes must be >= 8, got {args.test_shape}")
    if "dwp" in args.methods and args.prior_dir is None:
        parser.error("--methods dwp needs --prior-dir (python -m experiments.train_prior)")
    if args.data_dir is None and args.test_seed == DefaultDataset().seed:
        parser.error(
            f"--test-seed {args.test_seed} is the embedded training data's seed: its cases "
            "would be trained on; choose another"
        )
    args.methods = list(dict.fromkeys(args.methods))
    args.kinds = list(dict.fromkeys(args.kinds))
    args.levels = sorted(set(args.levels))
    return args


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.no_progress:
        print(f"shift_study: {text}", file=sys.stderr, flush=True)


def shifted_sets(args: argparse.Namespace) -> list[tuple[str, str | None, int]]:
    """(folder name, kind or None, level) of each test set: a shared level 0, then kind × level."""
    sets = [("level0", None, 0)] if 0 in args.levels else []
    sets += [(f"{k}-{lv}", k, lv) for k in args.kinds for lv in args.levels if lv > 0]
    return sets


def entries(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(row name, method, tta) per predictor, as in reproduce's methods table."""
    rows = []
    for method in args.methods:
        rows.append((method, method, "none"))
        if method in TTA_METHODS:
            rows.append((f"{method} + TTA", method, "flips"))
    return rows


def _training_shape(args: argparse.Namespace) -> tuple[int, int, int]:
    """The training data's grid: the embedded dataset's, or the first case's of --data-dir."""
    if args.data_dir is None:
        return tuple(DefaultDataset().shape)
    from vi_seg_jax.data.discovery import discover_cases
    from vi_seg_jax.io.nifti import read_nifti_header

    case = discover_cases(args.data_dir).cases[0]
    return tuple(read_nifti_header(next(iter(case.images.values()))).shape[:3])


def _settings(args: argparse.Namespace) -> dict:
    """What decides a cell's numbers (besides its method, test set and repeat)."""
    return {
        "preset": args.preset,
        "data_dir": None if args.data_dir is None else str(args.data_dir.absolute()),
        "prior_dir": None if args.prior_dir is None else str(args.prior_dir.absolute()),
        "train_size": args.train_size,
        "validation_size": args.validation_size,
        "steps": args.steps,
        "features": args.features,
        "test_cases": args.test_cases,
        "test_seed": args.test_seed,
        "test_shape": list(args.test_shape),
        "samples": args.samples,
        "kl_weight": args.kl_weight,
        "init_log_var": args.init_log_var,
    }


def _check_settings(args: argparse.Namespace) -> None:
    """Records the settings in `study.json`, or refuses an --out made with others."""
    from vi_seg_jax.errors import DataError
    from vi_seg_jax.io.folders import write_json_atomic

    path = args.out / "study.json"
    settings = _settings(args)
    if path.exists():
        recorded = json.loads(path.read_text())
        differ = [k for k in settings if recorded.get(k) != settings[k]]
        if differ:
            what = ", ".join(f"{k} {recorded.get(k)!r} (now {settings[k]!r})" for k in differ)
            raise DataError(path, f"records a study made with {what}; use another --out")
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, settings)


def write_test_sets(args: argparse.Namespace) -> dict[str, Path]:
    """Writes the missing test sets (each atomically); returns name -> folder."""
    from vi_seg_jax.data.synthetic import write_dataset

    folders = {}
    for name, kind, level in shifted_sets(args):
        folder = args.out / "testsets" / name
        if not folder.is_dir():
            start = time.perf_counter()
            write_dataset(
                folder,
                num_cases=args.test_cases,
                shape=tuple(args.test_shape),
                seed=args.test_seed,
                shift=None if kind is None else f"{kind}:{level}",
            )
            _say(args, f"wrote test set {name} ({time.perf_counter() - start:.0f} s)")
        folders[name] = folder
    return folders


def _prediction_complete(folder: Path, case_ids: set[str]) -> bool:
    from vi_seg_jax.evaluation import PREDICTION_FILE, PredictionRun

    return (folder / PREDICTION_FILE).is_file() and case_ids <= set(
        PredictionRun.read(folder).case_ids
    )


def read_cell(evaluation: Path) -> dict[str, float]:
    """A cell's numbers from its evaluation folder (whole tumour)."""
    summary = json.loads((evaluation / "summary.json").read_text())[REGION]
    over_cases = json.loads((evaluation / "uncertainty.json").read_text())[REGION]
    cell = {"cases": summary["dice"]["n"]}
    cell |= {metric: summary[metric]["mean"] for metric in CASE_MEANS}
    cell |= {column: over_cases[key] for column, key in OVER_CASES.items()}
    return cell


def score_cell(
    predictor_of, predictions: Path, evaluation: Path, data: Path, case_ids: set[str]
) -> bool:
    """Predicts `data` into `predictions` (unless every case is there) and evaluates it into
    `evaluation` (unless done); `predictor_of()` gives the predictor. Returns whether anything
    was done."""
    from vi_seg_jax.evaluation import PredictionRun, evaluate_folder
    from vi_seg_jax.predict import predict_folder

    if all((evaluation / name).exists() for name in ("summary.json", "uncertainty.json")):
        return False
    if not _prediction_complete(predictions, case_ids):
        # resume: a killed prediction keeps the cases it finished.
        predict_folder(
            predictor_of(), predictions, data_dir=data, progress=False, resume=True, figures=False
        )
    evaluate_folder(PredictionRun.read(predictions), evaluation, progress=False)
    return True


def _run_config(args: argparse.Namespace, method: str, repeat: int):
    """The methods table's run, with the study's VI settings (KL weight, initial variance)."""
    config = run_config(args, "unet", method, args.train_size, repeat)
    if not resolve_method(config.method).has_guide:  # the settings are the posterior's
        return config
    if args.kl_weight is not None:
        config = with_overrides(config, prior={"kl_weight": args.kl_weight})
    if args.init_log_var is not None:
        config = with_overrides(config, method={"guide": {"init_log_var": args.init_log_var}})
    return config


def run_cells(args: argparse.Namespace, folders: dict[str, Path], after_each) -> list[dict]:
    """Trains (or reuses) each run, predicts and evaluates each test set; one row per cell
    (level 0 once, with kind None). `after_each(rows)` after each run's cells."""
    from vi_seg_jax.data.discovery import discover_cases
    from vi_seg_jax.parallel import data_mesh

    sets = shifted_sets(args)
    case_ids = {n: {c.case_id for c in discover_cases(folders[n]).cases} for n, _, _ in sets}
    run_args = argparse.Namespace(**vars(args), test_size=0)  # the test sets are shifted
    rows: list[dict] = []
    for repeat in range(args.repeats):
        for method in args.methods:
            workdir = args.out / "runs" / f"{method}-r{repeat}"
            if not (workdir / "summary.json").exists():
                start = time.perf_counter()
                _say(args, f"training {method}, repeat {repeat}")
                train_or_reuse(_run_config(run_args, method, repeat), workdir)
                _say(
                    args, f"trained {method}, repeat {repeat} ({time.perf_counter() - start:.0f} s)"
                )
            for row_name, _, tta in (e for e in entries(args) if e[1] == method):
                folder = f"{method}-tta-r{repeat}" if tta == "flips" else f"{method}-r{repeat}"
                built = []  # the predictor, built once, on the first test set that needs it

                def predictor_of(workdir=workdir, tta=tta, built=built):
                    if not built:
                        built.append(
                            predictor_for(workdir, args.samples, tta=tta, mesh=data_mesh())
                        )
                    return built[0]

                for name, kind, level in sets:
                    start = time.perf_counter()
                    evaluation = args.out / "evaluation" / folder / name
                    predictions = args.out / "predictions" / folder / name
                    if score_cell(
                        predictor_of, predictions, evaluation, folders[name], case_ids[name]
                    ):
                        took = time.perf_counter() - start
                        _say(args, f"{row_name}, repeat {repeat}, {name}: scored ({took:.0f} s)")
                    cell = {"method": row_name, "kind": kind, "level": level, "repeat": repeat}
                    rows.append(cell | read_cell(evaluation))
            after_each(rows)
    return rows


def expand_level0(rows: list[dict], kinds: Sequence[str]) -> list[dict]:
    """cells.csv's rows: each level-0 cell under every kind, in entry, kind, level, repeat
    order."""
    expanded = []
    for row in rows:
        for kind in kinds if row["kind"] is None else [row["kind"]]:
            expanded.append(row | {"kind": kind})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    return sorted(
        expanded,
        key=lambda r: (methods.index(r["method"]), kinds.index(r["kind"]), r["level"], r["repeat"]),
    )


def write_tables(args: argparse.Namespace, rows: list[dict], *, plots: bool) -> None:
    from vi_seg_jax.plots import shift_figure

    tables = args.out / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    cells = expand_level0(rows, args.kinds)
    write_csv(tables / "cells.csv", cells)
    order = [name for name, _, _ in entries(args)]
    text = [
        "# Graded shift: mean ± std over repeats (n) per method and level\n",
        f"Whole tumour, {args.test_cases} test cases per cell, {args.samples} Monte Carlo "
        "samples; level 0 is the same unshifted test set under every kind.\n",
    ]
    for kind in args.kinds:
        of_kind = [r for r in cells if r["kind"] == kind]
        if not of_kind:
            continue
        text.append(f"## {kind}\n")
        for metric, heading, scale, decimals in TABLES:
            table = mean_std_table(
                of_kind,
                row_key="method",
                column_key="level",
                metric=metric,
                scale=scale,
                decimals=decimals,
                row_order=order,
            )
            text.append(f"### {heading}\n\n{table}")
        if plots:
            shift_figure(tables / f"shift_{kind}.png", of_kind, title=f"{kind} shift")
    write_text_atomic(tables / "shift.md", "\n".join(text))


def posterior_table(args: argparse.Namespace) -> str:
    """Where each trained posterior ended up (`bayes.guide.spread_report`): did its variances
    leave their initial value, and how much of the network does it leave uncertain?"""
    from vi_seg_jax.bayes.guide import spread_report
    from vi_seg_jax.run_folder import read_run

    lines = [
        "| run | KL weight | initial log σ² | log σ² 5% | median | 95% | σ > abs(μ) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in args.methods:
        for repeat in range(args.repeats):
            workdir = args.out / "runs" / f"{method}-r{repeat}"
            if not (workdir / "summary.json").exists():
                continue
            model = read_run(workdir)
            if model.state.guide is None:
                break
            report = spread_report(model.state.guide)
            lines.append(
                f"| {method}-r{repeat} | {model.config.prior.kl_weight:g} | "
                f"{model.config.method.guide.init_log_var:g} | {report['log_var_p5']:.2f} | "
                f"{report['log_var_median']:.2f} | {report['log_var_p95']:.2f} | "
                f"{100 * report['sigma_above_abs_mu']:.1f}% |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.test_shape is None:
        args.test_shape = _training_shape(args)
    _check_settings(args)
    start = time.perf_counter()
    folders = write_test_sets(args)
    rows = run_cells(args, folders, lambda rows: write_tables(args, rows, plots=False))
    write_tables(args, rows, plots=True)
    write_text_atomic(args.out / "tables" / "posterior.md", posterior_table(args))
    print((args.out / "tables" / "shift.md").read_text())
    took = (time.perf_counter() - start) / 60
    print(f"tables and plots in {args.out / 'tables'}/ ({took:.1f} min)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
