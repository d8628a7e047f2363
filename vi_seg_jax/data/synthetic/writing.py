"""Writing synthetic cases to disk in the BraTS release layouts and the MSD Task01 layout."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage

from vi_seg_jax.data.conventions import MODALITIES, get_layout
from vi_seg_jax.data.synthetic.config import DEFAULT_SHAPE, SyntheticConfig
from vi_seg_jax.data.synthetic.generator import SyntheticCase, generate_case
from vi_seg_jax.data.synthetic.pathology import case_grade
from vi_seg_jax.data.synthetic.shift import Shift
from vi_seg_jax.errors import DataError
from vi_seg_jax.io.folders import replace_folder
from vi_seg_jax.io.nifti import write_nifti


def case_id(layout: str, index: int) -> str:
    """The case identifier a release would use for case `index` (0-based).

    brats2018 `Brats18_SYN_0001_1`, brats2020 `BraTS20_Training_001`, brats2021
    `BraTS2021_00000`, brats2023 `BraTS-GLI-00000-000`, msd `BRATS_001`.
    """
    get_layout(layout)
    return {
        "brats2018": f"Brats18_SYN_{index + 1:04d}_1",
        "brats2020": f"BraTS20_Training_{index + 1:03d}",
        "brats2021": f"BraTS2021_{index:05d}",
        "brats2023": f"BraTS-GLI-{index:05d}-000",
        "msd": f"BRATS_{index + 1:03d}",
    }[layout]


def case_files(layout: str, index: int) -> dict[str, str]:
    """Relative paths of case `index`'s files in `layout`.

    BraTS layouts map each canonical modality and `"seg"` to a path
    (`[HGG|LGG/]<case>/<case><sep><suffix>.nii.gz`; brats2018 puts `case_grade(index)` first);
    msd maps `"image"` (4D) and `"label"`.
    """
    spec = get_layout(layout)
    name = case_id(layout, index)
    if layout == "msd":
        return {"image": f"imagesTr/{name}.nii.gz", "label": f"labelsTr/{name}.nii.gz"}
    folder = f"{case_grade(index)}/{name}" if layout == "brats2018" else name
    files = {
        modality: f"{folder}/{name}{spec.separator}{spec.modality_suffixes[modality]}.nii.gz"
        for modality in MODALITIES
    }
    files["seg"] = f"{folder}/{name}{spec.separator}{spec.label_suffix}.nii.gz"
    return files


def write_case(root: str | os.PathLike, case: SyntheticCase, layout: str) -> list[Path]:
    """Writes one case under `root` in `layout` (labels converted to the release's values)."""
    spec = get_layout(layout)
    root = Path(root)
    files = case_files(layout, case.index)
    labels = spec.convention.from_canonical(case.label)
    if layout == "msd":
        channels = sorted(MODALITIES, key=lambda m: spec.modality_suffixes[m])
        image = np.stack([case.images[m] for m in channels], axis=-1)
        return [
            write_nifti(root / files["image"], image, affine=case.affine),
            write_nifti(root / files["label"], labels, affine=case.affine, kind="label"),
        ]
    written = [
        write_nifti(root / files[modality], case.images[modality], affine=case.affine)
        for modality in MODALITIES
    ]
    written.append(write_nifti(root / files["seg"], labels, affine=case.affine, kind="label"))
    return written


def _msd_dataset_json(num_cases: int, domain: str, shift: Shift | None = None) -> dict:
    spec = get_layout("msd")
    names = {0: "background", 1: "edema", 2: "non-enhancing tumor", 3: "enhancing tumour"}
    training = []
    for index in range(num_cases):
        files = case_files("msd", index)
        training.append({"image": f"./{files['image']}", "label": f"./{files['label']}"})
    shifted = shift is not None and shift.active
    description = f"Synthetic vi_seg_jax cases ({domain}) in the MSD Task01 layout"
    if shifted:
        description += f", distribution shift {shift} (see docs/shift.md)"
    meta = {
        "name": "BRATS",
        "description": description,
        "reference": "vi_seg_jax.data.synthetic (MNI152 2009c template via nilearn)",
        "licence": "CC-BY-SA 4.0",
        "release": "synthetic",
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {str(v): names[v] for v in spec.convention.release_labels if v in names},
        "numTraining": num_cases,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    if shifted:  # level 0 is today's dataset, dataset.json included
        meta["shift"] = {"kind": shift.kind, "level": shift.level}
    return meta


def _check_destination(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(out, "exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(out, "already exists and is not empty (pass --overwrite to replace it)")


def _summary(case: SyntheticCase) -> str:
    brain = max(int(case.brain_mask.sum()), 1)
    counts = np.bincount(case.label.ravel(), minlength=4)
    wt = counts[1:4].sum() / brain
    if case.grade is None:
        lesions = ndimage.label(case.label > 0)[1]
        return f"{lesions} lesions, {100 * wt:.2f}% of brain"
    return f"{case.grade}, WT {100 * wt:.1f}% of brain, ET {100 * counts[3] / brain:.1f}%"


def write_dataset(
    out_dir: str | os.PathLike,
    *,
    num_cases: int,
    layout: str = "brats2021",
    domain: str = "tumour",
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    seed: int = 0,
    mass_effect: bool = True,
    shift: Shift | str | None = None,
    overwrite: bool = False,
    progress: bool | Callable[[str], None] | None = None,
) -> list[str]:
    """Generates `num_cases` cases and writes them to `out_dir` in a release layout.

    Everything is written into a hidden sibling folder (`.<name>.partial-XXXX`) that is renamed
    to `out_dir` at the end, so an interrupted run leaves nothing under the final name.

    Args:
      out_dir: destination folder; must be missing or empty unless `overwrite`.
      num_cases: number of cases, >= 1.
      layout: `brats2018`, `brats2020`, `brats2021`, `brats2023` or `msd`.
      domain: `tumour` or `lesions`.
      shape: output grid [X, Y, Z] (default (64, 64, 48)).
      seed: dataset seed.
      mass_effect: tumours push the surrounding tissue away.
      shift: a graded distribution shift, `Shift` or `"KIND:LEVEL"` (`scanner`, `contrast`,
        `anatomy`; level 0-3; see `shift.py` and docs/shift.md). Cases keep their ids and
        seeds; level 0 writes exactly the unshifted dataset. The msd layout records a shift of
        level >= 1 in dataset.json (`"shift": {"kind", "level"}`); the BraTS layouts have no
        metadata file, so nothing records it there.
      overwrite: replace a non-empty `out_dir`.
      progress: a function called with one line per written case, or True to print those
        lines to stderr.

    Returns:
      The case ids (see `case_id`; brats2018 cases lie under `HGG/` or `LGG/`).

    Raises:
      DataError: `out_dir` is not empty (and not `overwrite`) or is a file.
      ValueError: bad layout, domain, shape, shift or number of cases.
    """
    if num_cases < 1:
        raise ValueError(f"num_cases must be >= 1; got {num_cases}")
    if progress is True:
        progress = _print_to_stderr
    elif not progress:
        progress = None
    get_layout(layout)
    config = SyntheticConfig(
        shape=shape, domain=domain, seed=seed, mass_effect=mass_effect, shift=shift
    )
    out = Path(out_dir)
    _check_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    partial.mkdir()
    try:
        ids = []
        for index in range(num_cases):
            start = time.perf_counter()
            case = generate_case(config, index)
            write_case(partial, case, layout)
            ids.append(case_id(layout, index))
            if progress is not None:
                seconds = time.perf_counter() - start
                progress(f"{ids[-1]}: {_summary(case)} ({seconds:.1f} s)")
        if layout == "msd":
            text = json.dumps(_msd_dataset_json(num_cases, domain, config.shift), indent=4)
            (partial / "dataset.json").write_text(text + "\n")
        _check_destination(out, overwrite)  # another writer may have finished meanwhile
        replace_folder(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return ids


def _print_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
