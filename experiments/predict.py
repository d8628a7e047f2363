"""Segment cases with a trained run and write uncertainty maps (QU-BraTS format).

    python -m experiments.predict --checkpoint runs/unet-vi-quick-seed0 --input CASE_OR_DATASET \\
        --out predictions/ [--samples 20] [--tta flips]
    python -m experiments.predict --checkpoint runs/unet-vi-quick-seed0 --split test --out predictions/

Per case, on the source grid with the source affine (opens in 3D Slicer / ITK-SNAP):
<case>_seg.nii.gz (labels in the input release's convention; 0/1 whole tumour for a
`wt` model), <case>_unc_{wt,tc,et}.nii.gz (uncertainty in [0, 100], QU-BraTS 2020),
<case>_aleatoric / _epistemic / _prob.nii.gz (float maps; _prob_uncalibrated too when a
temperature is applied) and <case>_overview.png. `OUT/prediction.json` records the
checkpoint, step, samples, windows and temperatures used. The temperatures were fitted with
the default samples and windows, without TTA; other settings are allowed, with a note.
`--continue` picks up an interrupted run: cases already written in full with the same
settings (TTA included) are kept.

`--tta flips` (test-time augmentation) evaluates every sample on each mirroring of the
spatial axes (8 in 3D, 4 for a 2D backbone: that many times the cost), flipped back, and
pools all (sample, flip) pairs into the predictive; <case>_tta.nii.gz is the variance across
the flips' means, and _epistemic the variance within a flip, so that aleatoric + epistemic +
tta = p̄(1 − p̄). The temperatures are applied unchanged.

The Monte Carlo samples of a case are spread over all devices (`--devices N` for fewer);
the maps equal one device's up to float rounding. Multi-process runs take the flags of
`experiments.train`; process 0 writes the files. The library function is
`vi_seg_jax.predict.predict_folder`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from experiments.common import add_device_flags, distributed_config, make_parser, run_cli


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = make_parser("experiments.predict", __doc__)
    add = parser.add_argument
    add("--checkpoint", required=True, type=Path, help="a training workdir (its best checkpoint)")
    add("--input", type=Path, help="one case folder or a BraTS-layout dataset")
    add(
        "--split",
        choices=("test", "validation"),
        help="only the run's held-out cases of this split (from its splits.json); --input "
        "defaults to the run's dataset",
    )
    add("--out", required=True, type=Path, help="output folder (created)")
    add(
        "--samples",
        type=int,
        default=None,
        help="Monte Carlo samples T per case (default: 20; ensemble: its members; MAP: 1)",
    )
    add("--step", type=int, default=None, help="checkpoint step (default: best by val Dice)")
    add("--window", type=int, default=96, help="sliding-window tile size (3D backbones)")
    add("--overlap", type=float, default=0.25, help="overlap of neighbouring tiles, in [0, 1)")
    add("--tile-batch", type=int, default=1, help="tiles evaluated together")
    add("--chunk", type=int, default=1, help="samples evaluated together (memory grows with it)")
    add(
        "--tta",
        choices=("none", "flips"),
        default="none",
        help="test-time augmentation: 'flips' evaluates every sample on each mirroring of the "
        "spatial axes (8 in 3D, 4 in 2D; cost ×8 / ×4) and writes <case>_tta.nii.gz",
    )
    add("--skip-bad", action="store_true", help="warn about and skip invalid cases")
    add(
        "--continue",
        dest="resume",
        action="store_true",
        help="keep the cases --out already holds in full from a run with the same checkpoint, "
        "input and settings (its prediction.json), and predict only the rest",
    )
    add("--no-progress", action="store_true", help="no progress bars")
    add_device_flags(parser)
    args = parser.parse_args(argv)
    if args.input is None and args.split is None:
        parser.error("give --input, --split, or both")
    if args.samples is not None and args.samples < 1:
        parser.error("--samples must be >= 1")
    if not 0.0 <= args.overlap < 1.0:
        parser.error("--overlap must be in [0, 1)")
    if min(args.window, args.tile_batch, args.chunk) < 1:
        parser.error("--window, --tile-batch and --chunk must be >= 1")
    from vi_seg_jax.parallel import data_mesh, initialize_distributed

    try:
        initialize_distributed(distributed_config(args))
        args.mesh = data_mesh(args.devices)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from vi_seg_jax.predict import Predictor, load_trained, predict_folder

    predictor = Predictor(
        load_trained(args.checkpoint, args.step),
        num_samples=args.samples,
        chunk_size=args.chunk,
        window_size=args.window,
        overlap=args.overlap,
        tile_batch=args.tile_batch,
        mesh=args.mesh,
        tta=args.tta,
    )
    record = predict_folder(
        predictor,
        args.out,
        data_dir=args.input,
        split=args.split,
        skip_bad=args.skip_bad,
        progress=not args.no_progress,
        resume=args.resume,
    )
    flips = "" if predictor.flips is None else f" × {predictor.num_flips} flips"
    print(
        f"{len(record['cases'])} case(s), {record['samples']} samples each{flips}, "
        f"checkpoint step {record['step']}: {args.out}/",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
