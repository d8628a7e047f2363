"""Score predictions against ground truth: Dice, IoU, HD95, calibration, QU-BraTS.

    python -m experiments.evaluate --pred predictions/ [--data-dir DATASET] --out evaluation/

Reads the folder `experiments.predict` wrote and the matching cases of a BraTS-layout
dataset. Writes `cases.csv` (one row per case, `<region>_<metric>` columns),
`summary.json` (per region `wt`/`tc`/`et` and metric: mean, std, n), `summary.md`,
`reliability.png` (before and after temperature scaling) and `qubrats_curves.png`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from experiments.common import run_cli


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.evaluate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--pred", required=True, type=Path, help="a folder written by experiments.predict")
    add(
        "--data-dir",
        type=Path,
        help="the dataset holding the ground truth (default: the input recorded by predict)",
    )
    add("--out", required=True, type=Path, help="output folder (created)")
    add("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from tqdm.auto import tqdm

    from vi_seg_jax.data.discovery import discover_cases
    from vi_seg_jax.errors import DataError
    from vi_seg_jax.evaluation import (
        PredictionRun,
        evaluate_case,
        markdown_table,
        mean_curves,
        pool_bins,
        summarize,
        write_cases_csv,
    )
    from vi_seg_jax.io.folders import write_json_atomic, write_text_atomic
    from vi_seg_jax.plots import qubrats_figure, reliability_figure

    run = PredictionRun.read(args.pred)
    data_dir = args.data_dir or run.input
    dataset = discover_cases(data_dir, require_labels=True)
    by_id = {case.case_id: case for case in dataset.cases}
    missing = [c for c in run.case_ids if c not in by_id]
    if missing:
        raise DataError(data_dir, f"has no ground truth for predicted case(s) {missing}")
    if not run.case_ids:
        raise DataError(args.pred, "holds no predicted cases")
    progress = None if not args.no_progress else True
    scores = [
        evaluate_case(run, by_id[case_id])
        for case_id in tqdm(run.case_ids, desc="evaluating", unit="case", disable=progress)
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    regions = run.regions
    write_cases_csv(args.out / "cases.csv", scores, regions)
    summary = summarize(scores, regions)
    write_json_atomic(args.out / "summary.json", summary)
    table = markdown_table(summary, regions)
    write_text_atomic(args.out / "summary.md", table + "\n")
    reliability_figure(
        args.out / "reliability.png",
        {
            f"{region} {when}": pool_bins([s.bins[region][when] for s in scores])
            for region in regions
            for when in ("before", "after")
        },
        title=f"{len(scores)} case(s), inside the brain mask",
    )
    qubrats_figure(
        args.out / "qubrats_curves.png",
        {region: mean_curves([s.curves[region] for s in scores]) for region in regions},
        title=f"QU-BraTS filtering curves, mean of {len(scores)} case(s)",
    )
    print(table)
    print(f"results in {args.out}/ (cases.csv, summary.json, plots)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
