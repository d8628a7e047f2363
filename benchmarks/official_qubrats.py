"""Cross-checks the project's QU-BraTS AUCs against the challenge's official scorer.

Usage (from the repository root):
  python -m benchmarks.official_qubrats --scorer BraTS_Seg_Uncertainty.py --python PYTHON \\
      --pred PREDICTIONS --eval EVALUATION [--data-dir DATASET] [--jobs N] [--keep DIR]

`--scorer` is the official QU-BraTS script (`BraTS_Seg_Uncertainty.py` of the
RagMeh11/QU-BraTS repository), run as it is, never imported or copied; `--python` is an
interpreter that has its dependencies (numpy, pandas, scikit-learn, nibabel, matplotlib).
`--pred` is a folder written by `python -m experiments.predict` with a `regions` model and
`--eval` what `python -m experiments.evaluate` wrote for it (its `cases.csv`).

For every predicted case the official script is run once, as the challenge ran it:

  PYTHON SCORER -s <case>_seg.nii.gz -r <ground truth> -w <case>_unc_wt.nii.gz
      -c <case>_unc_tc.nii.gz -e <case>_unc_et.nii.gz -m <T1 image> -o <tmp>/<case> -n 40 -a

with the ground truth and the T1 image (the scorer's documented stand-in for a brain mask,
T1 > 0, which `vi_seg_jax.evaluation` uses too) from the case's folder of the dataset
(`--data-dir`, default the input recorded in `prediction.json`), found by
`discover_cases`. Its CSV (rows WT/TC/ET, columns DICE_AUC, FTP_RATIO_AUC, FTN_RATIO_AUC)
is compared with the `<region>_qubrats_{dice,ftp,ftn}_auc` columns of `cases.csv`.

Prints one JSON line: `max_abs_diff` per region and AUC (the largest |official − ours|
over the cases), the `worst` of them, `cases`, `scorer_numpy` (the NumPy of `--python`:
under NumPy 2 the scorer's threshold grid loses τ = 100, see `vi_seg_jax.metrics`, and the
AUCs differ by more than the tolerance; the challenge ran NumPy 1.x) and `agree_to_1e-4`.
Exit status 0 when every difference is below 1e-4, 1 otherwise, 2 with one line on stderr
for a missing or unusable input (file, folder, column, case, or a scorer that fails).

The official scorer reads the BraTS 2018-2021 labels 1/2/4 (ET = 4), so the dataset must
use that convention (layouts brats2018, brats2020, brats2021); others are refused.
`cases.csv` holds 6 significant digits, far below the tolerance.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vi_seg_jax.data.conventions import BRATS_2018_2021, REGION_NAMES
from vi_seg_jax.data.discovery import discover_cases
from vi_seg_jax.errors import DataError
from vi_seg_jax.evaluation import PredictionRun

TOLERANCE = 1e-4
AGREE = "agree_to_1e-4"  # the JSON key of the verdict
NUM_POINTS = 40  # the scorer's `-n`: 40 steps of 2.5, 41 thresholds under NumPy 1.x
# Our AUC name -> the official CSV's column.
AUCS = {"dice_auc": "DICE_AUC", "ftp_auc": "FTP_RATIO_AUC", "ftn_auc": "FTN_RATIO_AUC"}
# The scorer's uncertainty flags, per region.
_UNCERTAINTY_FLAGS = {"wt": "-w", "tc": "-c", "et": "-e"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.official_qubrats",
        description=__doc__.split("\n\n")[0],
    )
    add = parser.add_argument
    add("--scorer", required=True, type=Path, help="the official BraTS_Seg_Uncertainty.py")
    add("--python", required=True, type=Path, help="a Python with the scorer's dependencies")
    add("--pred", required=True, type=Path, help="a folder written by experiments.predict")
    add("--eval", required=True, type=Path, help="experiments.evaluate's output for --pred")
    add(
        "--data-dir",
        type=Path,
        help="the dataset holding the ground truth (default: the input recorded by predict)",
    )
    add("--jobs", type=int, default=1, help="scorer processes run at once (default: 1)")
    add("--keep", type=Path, help="keep the scorer's CSVs in this folder (default: discarded)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the check; returns 0 on agreement, 1 otherwise (raises DataError on bad input)."""
    args = parse_args(argv)
    if not args.scorer.is_file():
        raise DataError(args.scorer, "scorer script not found")
    if not args.python.is_file() and shutil.which(args.python) is not None:
        args.python = Path(shutil.which(args.python))  # a command name on PATH
    if not args.python.is_file() or not os.access(args.python, os.X_OK):
        raise DataError(args.python, "not an executable Python interpreter")
    run = PredictionRun.read(args.pred)
    if run.task != "regions":
        raise DataError(
            args.pred,
            f"holds a {run.task!r} model's predictions; the official scorer needs the WT, TC "
            "and ET maps of a 'regions' model",
        )
    if not run.case_ids:
        raise DataError(args.pred, "holds no predicted cases")
    ours = read_cases_csv(args.eval / "cases.csv", run.case_ids)
    data_dir = args.data_dir or run.input
    dataset = discover_cases(data_dir, modalities=("t1",))
    convention = dataset.layout.convention
    if convention != BRATS_2018_2021:
        raise DataError(
            data_dir,
            f"labels follow {convention.name} {list(convention.release_labels)}; the official "
            f"scorer reads {list(BRATS_2018_2021.release_labels)} (ET = 4): use a BraTS "
            "2018-2021 layout",
        )
    by_id = {case.case_id: case for case in dataset.cases}
    commands = {}
    for case_id in run.case_ids:
        case = by_id.get(case_id)
        if case is None or case.label is None:
            raise DataError(data_dir, f"has no ground truth for predicted case {case_id}")
        files = ["-s", str(run.path(case_id, "seg")), "-r", str(case.label)]
        for region in REGION_NAMES:
            files += [_UNCERTAINTY_FLAGS[region], str(run.path(case_id, f"unc_{region}"))]
        files += ["-m", str(case.images["t1"])]
        commands[case_id] = [str(args.python), str(args.scorer), *files]
    numpy_version = scorer_numpy(args.python)

    with tempfile.TemporaryDirectory(prefix="official_qubrats_") as tmp:
        out = args.keep or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)

        def score(case_id: str) -> dict[str, dict[str, float]]:
            stem = out / case_id
            command = [*commands[case_id], "-o", str(stem), "-n", str(NUM_POINTS), "-a"]
            return run_scorer(command, stem.with_suffix(".csv"), args.scorer, case_id)

        with ThreadPoolExecutor(args.jobs) as pool:
            official = dict(zip(run.case_ids, pool.map(score, run.case_ids), strict=True))

    record = compare(official, ours)
    record["scorer_numpy"] = numpy_version
    if int(numpy_version.split(".")[0]) >= 2:
        record["note"] = (
            "the scorer ran under NumPy 2, where its threshold grid drops tau = 100 (40 points, "
            "not the 41 of NumPy 1.x that the project reproduces)"
        )
    print(json.dumps(record))
    return 0 if record[AGREE] else 1


def read_cases_csv(path: Path, case_ids: Sequence[str]) -> dict[str, dict[str, dict[str, float]]]:
    """case -> region -> AUC name -> value, from `experiments.evaluate`'s `cases.csv`."""
    if not path.is_file():
        raise DataError(path, "missing (written by experiments.evaluate)")
    with open(path, newline="") as handle:
        rows = {row["case_id"]: row for row in csv.DictReader(handle) if row.get("case_id")}
    values: dict[str, dict[str, dict[str, float]]] = {}
    for case_id in case_ids:
        row = rows.get(case_id)
        if row is None:
            raise DataError(path, f"no row for predicted case {case_id}")
        values[case_id] = {}
        for region in REGION_NAMES:
            values[case_id][region] = {}
            for name in AUCS:
                column = f"{region}_qubrats_{name}"
                if row.get(column) in (None, ""):
                    raise DataError(path, f"no value in column {column} for case {case_id}")
                values[case_id][region][name] = float(row[column])
    return values


def scorer_numpy(python: Path) -> str:
    """The NumPy version of the scorer's interpreter."""
    result = subprocess.run(
        [str(python), "-c", "import numpy; print(numpy.__version__)"],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise DataError(python, f"cannot import numpy: {_last_line(result.stderr)}")
    return result.stdout.strip()


def run_scorer(
    command: list[str], csv_path: Path, scorer: Path, case_id: str
) -> dict[str, dict[str, float]]:
    """Runs the official script on one case; region -> AUC name -> value from its CSV."""
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "MPLBACKEND": "Agg"}
    )
    if result.returncode != 0:
        raise DataError(
            scorer,
            f"failed on case {case_id} (exit status {result.returncode}): "
            f"{_last_line(result.stderr)}",
        )
    if not csv_path.is_file():
        raise DataError(csv_path, f"not written by the scorer for case {case_id}")
    with open(csv_path, newline="") as handle:
        rows = {row.get("TUMOR_TYPE"): row for row in csv.DictReader(handle)}
    values: dict[str, dict[str, float]] = {}
    for region in REGION_NAMES:
        row = rows.get(region.upper())
        if row is None:
            raise DataError(csv_path, f"no {region.upper()} row (case {case_id})")
        values[region] = {}
        for name, column in AUCS.items():
            if row.get(column) in (None, ""):
                raise DataError(csv_path, f"no {column} value for {region.upper()}")
            values[region][name] = float(row[column])
    return values


def _difference(official: float, ours: float) -> float:
    if math.isnan(official) or math.isnan(ours):
        return 0.0 if math.isnan(official) and math.isnan(ours) else math.inf
    return abs(official - ours)


def compare(
    official: dict[str, dict[str, dict[str, float]]], ours: dict[str, dict[str, dict[str, float]]]
) -> dict:
    """Max |official − ours| per region and AUC over the cases, and whether all are small."""
    largest = {region: dict.fromkeys(AUCS, 0.0) for region in REGION_NAMES}
    worst = {"abs_diff": -1.0}
    for case_id, regions in official.items():
        for region in REGION_NAMES:
            for name in AUCS:
                theirs, mine = regions[region][name], ours[case_id][region][name]
                diff = _difference(theirs, mine)
                largest[region][name] = max(largest[region][name], diff)
                if diff > worst["abs_diff"]:
                    worst = {
                        "abs_diff": diff,
                        "case": case_id,
                        "region": region,
                        "auc": name,
                        "official": theirs,
                        "ours": mine,
                    }
    agree = all(d < TOLERANCE for by_auc in largest.values() for d in by_auc.values())
    return {
        "max_abs_diff": largest,
        "worst": worst,
        "cases": len(official),
        "num_points": NUM_POINTS,
        AGREE: agree,
    }


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def cli(argv: Sequence[str] | None = None) -> int:
    """`main` with bad input reported on one line of stderr and exit status 2."""
    try:
        return main(argv)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
