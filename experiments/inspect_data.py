"""Check a BraTS folder and prepare its preprocessed cache.

    python -m experiments.inspect_data                    # the embedded synthetic dataset
    python -m experiments.inspect_data --data-dir /path/to/BraTS2021_Training_Data

Reports the layout found, validates every case (readable files, matching shapes and
affines, finite intensities, labels from the release's convention), prints per-case
tumour-region volumes and writes the preprocessed cache that training reads. Bad input
ends with one line naming the file and exit code 2; `--skip-bad` warns and goes on.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np

from experiments.common import run_cli
from vi_seg_jax.data.cache import default_cache_dir, prepare_dataset
from vi_seg_jax.data.conventions import MODALITIES, REGION_NAMES, regions_from_classes
from vi_seg_jax.data.default import ensure_default_dataset
from vi_seg_jax.data.discovery import discover_cases
from vi_seg_jax.data.preprocess import PreprocessConfig


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.inspect_data", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--data-dir",
        help="BraTS 2018-2024 or MSD Task01 folder, or one case folder "
        "(default: the embedded synthetic dataset, generated once into the cache)",
    )
    parser.add_argument(
        "--modalities",
        nargs="+",
        default=list(MODALITIES),
        choices=MODALITIES,
        help="modalities every case must have, in channel order (default: all four)",
    )
    parser.add_argument(
        "--require-labels", action="store_true", help="treat a case without seg file as bad"
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="warn about bad cases and skip them instead of stopping",
    )
    parser.add_argument(
        "--cache-dir", help="preprocessed cache folder (default: under the user cache)"
    )
    parser.add_argument(
        "--normalization",
        choices=("zscore", "minmax"),
        default="zscore",
        help="per-modality intensity normalisation inside the brain mask (default: zscore)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    data_dir = args.data_dir or ensure_default_dataset()
    dataset = discover_cases(
        data_dir,
        modalities=args.modalities,
        require_labels=args.require_labels,
        skip_bad=args.skip_bad,
    )
    print(dataset.summary())
    start = time.perf_counter()
    prepared = prepare_dataset(
        dataset,
        args.cache_dir,
        modalities=args.modalities,
        config=PreprocessConfig(normalization=args.normalization),
        skip_bad=args.skip_bad,
        progress=True,
    )
    seconds = time.perf_counter() - start

    print(
        f"{'case':<28} {'grid':>15} {'voxel mm':>16} "
        + " ".join(f"{r + ' ml':>8}" for r in REGION_NAMES)
    )
    for case in prepared:
        voxel_ml = abs(np.linalg.det(case.affine[:3, :3])) / 1000.0
        spacing = "x".join(f"{s:.2g}" for s in np.linalg.norm(case.affine[:3, :3], axis=0))
        grid = "x".join(map(str, case.mapping.original_shape))
        if case.label is None:
            volumes = " ".join(f"{'-':>8}" for _ in REGION_NAMES)
        else:
            counts = regions_from_classes(np.asarray(case.label)).sum(axis=(0, 1, 2))
            volumes = " ".join(f"{c * voxel_ml:8.1f}" for c in counts)
        print(f"{case.case_id:<28} {grid:>15} {spacing:>16} {volumes}")
    cache_dir = args.cache_dir or default_cache_dir(dataset.root)
    print(f"{len(prepared)} cases valid; preprocessed cache at {cache_dir} ({seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    run_cli(main)
