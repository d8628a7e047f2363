"""Writes synthetic BraTS-like cases in a release layout (the project's default dataset).

    python -m experiments.make_data --out data/synthetic --cases 20
    python -m experiments.make_data --out data/ms --cases 10 --domain lesions --layout msd
    python -m experiments.make_data --out data/full --cases 2 --shape 240 240 155
    python -m experiments.make_data --out data/scanner2 --cases 20 --shift scanner:2

`--shift KIND:LEVEL` writes the same cases (same ids, brains and seeds) under a graded
distribution shift: `scanner` (noise, bias, slice thickness, intensity response), `contrast`
(T1ce enhancement, FLAIR/T2 lesion contrast) or `anatomy` (tumour size, multifocality,
location; tumour domain only), at LEVEL 0 (none: bitwise the unshifted data) to 3; see
docs/shift.md. scanner and contrast keep the labels bitwise.

About 0.5 s per case on the default 64 x 64 x 48 grid (one CPU core, writing included), plus
about a second to load the MNI152 template once; 10-25 s per case at 240 x 240 x 155. Prints one
line per case and a final summary. Output is written into a hidden sibling folder and renamed
into place at the end; a non-empty --out is refused (exit status 2) unless --overwrite. The
generator lives in `vi_seg_jax.data.synthetic`; see its docstring for what a case contains.
"""

from __future__ import annotations

import argparse
import sys

from vi_seg_jax.data.conventions import LAYOUTS
from vi_seg_jax.data.synthetic import (
    DEFAULT_SHAPE,
    DOMAINS,
    MAX_SHIFT_LEVEL,
    MIN_SIZE,
    SHIFT_KINDS,
    Shift,
    write_dataset,
)
from vi_seg_jax.errors import DataError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _grid_size(text: str) -> int:
    value = int(text)
    if value < MIN_SIZE:
        raise argparse.ArgumentTypeError(f"each size must be >= {MIN_SIZE}, got {value}")
    return value


def _shift(text: str) -> Shift:
    try:
        return Shift.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.make_data",
        description="Generate synthetic BraTS-like brain MRI cases (T1, T1ce, T2, FLAIR and a "
        "tumour segmentation) from the MNI152 template and write them in a BraTS or MSD layout.",
    )
    parser.add_argument("--out", required=True, help="destination folder (missing or empty)")
    parser.add_argument("--cases", type=_positive_int, required=True, help="number of cases")
    parser.add_argument(
        "--layout",
        choices=sorted(LAYOUTS),
        default="brats2021",
        help="file naming and label values of a release (default: %(default)s)",
    )
    parser.add_argument(
        "--domain",
        choices=DOMAINS,
        default="tumour",
        help="gliomas with three sub-regions, or small MS-like lesions (default: %(default)s)",
    )
    parser.add_argument(
        "--shape",
        type=_grid_size,
        nargs=3,
        metavar=("X", "Y", "Z"),
        default=list(DEFAULT_SHAPE),
        help="voxels per axis over a 240 x 240 x 155 mm field of view (default: "
        f"{' '.join(map(str, DEFAULT_SHAPE))}; 240 240 155 gives BraTS's 1 mm grid)",
    )
    parser.add_argument("--seed", type=_seed, default=0, help="dataset seed (default: %(default)s)")
    parser.add_argument(
        "--no-mass-effect", action="store_true", help="do not push tissue away from tumours"
    )
    parser.add_argument(
        "--shift",
        type=_shift,
        metavar="KIND:LEVEL",
        help=f"graded distribution shift, KIND one of {', '.join(SHIFT_KINDS)} and LEVEL "
        f"0-{MAX_SHIFT_LEVEL} (0: none; anatomy needs --domain tumour); see docs/shift.md",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out even if it is not empty"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.shift is not None and args.shift.kind == "anatomy" and args.domain != "tumour":
        parser.error(f"--shift {args.shift} needs --domain tumour")
    try:
        ids = write_dataset(
            args.out,
            num_cases=args.cases,
            layout=args.layout,
            domain=args.domain,
            shape=tuple(args.shape),
            seed=args.seed,
            mass_effect=not args.no_mass_effect,
            shift=args.shift,
            overwrite=args.overwrite,
            progress=lambda line: print(line, flush=True),
        )
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    shape = "x".join(str(s) for s in args.shape)
    shifted = f", shift {args.shift}" if args.shift is not None else ""
    print(
        f"wrote {len(ids)} {args.domain} cases ({args.layout} layout, {shape}{shifted}) "
        f"to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
