"""Segment cases with a trained run and write uncertainty maps (QU-BraTS format).

    python -m experiments.predict --checkpoint runs/unet-vi-quick-seed0 --input CASE_OR_DATASET \\
        --out predictions/ [--samples 20]
    python -m experiments.predict --checkpoint runs/unet-vi-quick-seed0 --split test --out predictions/

Per case, on the source grid with the source affine (opens in 3D Slicer / ITK-SNAP):
<case>_seg.nii.gz (labels in the input release's convention; 0/1 whole tumour for a
`wt` model), <case>_unc_{wt,tc,et}.nii.gz (uncertainty in [0, 100], QU-BraTS 2020),
<case>_aleatoric / _epistemic / _prob.nii.gz (float maps; _prob_uncalibrated too when a
temperature is applied) and <case>_overview.png. `OUT/prediction.json` records the
checkpoint, step, samples, windows and temperatures used. The temperatures were fitted with
the default samples and windows; other settings are allowed, with a note.

The Monte Carlo samples of a case are spread over all devices (`--devices N` for fewer);
the maps equal one device's up to float rounding. Multi-process runs take the flags of
`experiments.train`; process 0 writes the files.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from experiments.common import add_device_flags, distributed_config, run_cli


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.predict",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
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
    add("--skip-bad", action="store_true", help="warn about and skip invalid cases")
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
    from tqdm.auto import tqdm

    from vi_seg_jax.data.discovery import discover_cases
    from vi_seg_jax.errors import DataError
    from vi_seg_jax.io.folders import write_json_atomic
    from vi_seg_jax.parallel import is_primary
    from vi_seg_jax.predict import Predictor, load_trained, read_splits, write_case

    model = load_trained(args.checkpoint, args.step)
    data_dir, wanted = args.input, None
    if args.split is not None:
        splits = read_splits(args.checkpoint)
        data_dir = data_dir or Path(splits["root"])
        wanted = set(splits[args.split])
    dataset = discover_cases(
        data_dir,
        modalities=model.config.data.modalities,
        require_labels=False,
        skip_bad=args.skip_bad,
    )
    cases = [c for c in dataset.cases if wanted is None or c.case_id in wanted]
    if not cases:
        raise DataError(data_dir, f"holds none of the run's {args.split} cases")
    predictor = Predictor(
        model,
        num_samples=args.samples,
        chunk_size=args.chunk,
        window_size=args.window,
        overlap=args.overlap,
        tile_batch=args.tile_batch,
        mesh=args.mesh,
    )
    primary = is_primary()
    calibrated_with = model.calibrated_with
    if calibrated_with and calibrated_with != predictor.settings() and primary:
        print(
            f"note: the temperatures were fitted with {calibrated_with}; this run uses "
            f"{predictor.settings()}, so they may calibrate it less well",
            file=sys.stderr,
        )
    if primary:
        args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "checkpoint": str(args.checkpoint),
        "input": str(Path(data_dir).absolute()),
        "step": model.step,
        "task": model.task,
        **predictor.settings(),
        "devices": predictor.devices,
        "temperature": {r: model.temperatures.get(r, 1.0) for r in model.regions},
        "cases": [],
    }
    progress = not args.no_progress and primary
    for case in tqdm(cases, desc="cases", unit="case", disable=None if progress else True):
        prediction = predictor.predict_case(case, progress=progress)
        record["cases"].append(case.case_id)
        if primary:
            write_case(args.out, prediction, model.regions)
            write_json_atomic(args.out / "prediction.json", record)
    print(
        f"{len(record['cases'])} case(s), {predictor.num_samples} samples each, "
        f"checkpoint step {model.step}: {args.out}/",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
