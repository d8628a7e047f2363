"""Score predictions against ground truth: Dice, IoU, HD95, calibration, QU-BraTS.

    python -m experiments.evaluate --pred predictions/ [--data-dir DATASET] --out evaluation/
        [--brats-metrics]

Reads the folder `experiments.predict` wrote and the matching cases of a BraTS-layout
dataset. Writes `cases.csv` (one row per case, `<region>_<metric>` columns),
`summary.json` (per region `wt`/`tc`/`et` and metric: mean, std, n), `summary.md`,
`reliability.png` (before and after temperature scaling) and `qubrats_curves.png`; the
library function is `vi_seg_jax.evaluation.evaluate_folder`.

`--brats-metrics` adds the lesion-wise BraTS metrics (BraTS 2023+ ranking) computed by the
challenge organisers' package, BraTS-evaluation (`pip install -e ".[brats]"`): per region the
columns `<region>_lesion_dice`, `_lesion_hd95`, `_lesion_nsd`, `_lesion_pq`, `_lesion_tp`,
`_lesion_fp`, `_lesion_fn`, their means in `summary.json`, and `brats_metrics.yaml` (the
configuration it ran with); see `vi_seg_jax.brats_metrics`. Without the package it stops with
one line and exit code 2 before scoring anything.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from experiments.common import EXIT_BAD_INPUT, make_parser, run_cli


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = make_parser("experiments.evaluate", __doc__)
    add = parser.add_argument
    add("--pred", required=True, type=Path, help="a folder written by experiments.predict")
    add(
        "--data-dir",
        type=Path,
        help="the dataset holding the ground truth (default: the input recorded by predict)",
    )
    add("--out", required=True, type=Path, help="output folder (created)")
    add(
        "--brats-metrics",
        action="store_true",
        help="also the lesion-wise BraTS metrics (Dice, HD95, NSD, panoptic quality, lesion "
        "counts per region) of the official BraTS-evaluation package "
        '(pip install -e ".[brats]")',
    )
    add("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from vi_seg_jax.brats_metrics import MissingBratsMetrics
    from vi_seg_jax.evaluation import PredictionRun, evaluate_folder, markdown_table

    run = PredictionRun.read(args.pred)
    try:
        summary = evaluate_folder(
            run,
            args.out,
            data_dir=args.data_dir,
            progress=not args.no_progress,
            brats_metrics=args.brats_metrics,
        )
    except MissingBratsMetrics as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(markdown_table(summary, run.regions))
    print(f"results in {args.out}/ (cases.csv, summary.json, plots)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
