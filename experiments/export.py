"""Pack a trained run into one portable model file (.vsj) for sharing and prediction.

    python -m experiments.export --checkpoint runs/unet-vi-quick-seed0 --out unet-vi.vsj [--step N]

The file is a zip archive holding the run's configuration, the posterior parameters of one
checkpoint (no optimiser state), its temperatures and the predictor settings they were
fitted with, the backbone, task and regions, and a manifest with each member's SHA-256.
Nothing in it is pickled, so loading one from a stranger runs no code; a damaged, foreign
or newer-format file is refused with a one-line error. The file is written atomically: an
interrupted export leaves no partial file, and an existing archive at --out is replaced
only once the new one is complete. `experiments.predict --checkpoint MODEL.vsj` reads it as
it reads the run (`--split` excepted: the archive holds no splits.json). The library
functions are `vi_seg_jax.model_archive.export_model` and `load_archive`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from experiments.common import make_parser, run_cli


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = make_parser("experiments.export", __doc__)
    add = parser.add_argument
    add("--checkpoint", metavar="RUN", required=True, type=Path, help="a training workdir")
    add(
        "--out",
        metavar="MODEL",
        required=True,
        type=Path,
        help="the model file to write, e.g. MODEL.vsj (an existing model file is replaced; "
        "any other file is left alone)",
    )
    add(
        "--step",
        type=int,
        help="checkpoint step (default: best by validation Dice, else the latest)",
    )
    return parser.parse_args(argv)


def _size(num_bytes: int) -> str:
    if num_bytes >= 2**20:
        return f"{num_bytes / 2**20:.1f} MiB"
    return f"{num_bytes / 2**10:.1f} KiB" if num_bytes >= 2**10 else f"{num_bytes} bytes"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from vi_seg_jax.model_archive import export_model

    record = export_model(args.checkpoint, args.out, args.step)
    temperature = record["temperature"]
    calibration = (
        "temperature " + ", ".join(f"{r} {t:.3g}" for r, t in temperature.items())
        if temperature
        else "no temperatures"
    )
    print(
        f"wrote {record['path']} ({_size(record['bytes'])}): {record['backbone']} "
        f"{record['method']}, task {record['task']}, checkpoint step {record['step']}, "
        f"{calibration}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
