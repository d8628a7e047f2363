"""Tiny hand-made cases in every layout, independent of the synthetic generator."""

from pathlib import Path

import numpy as np

from vi_seg_jax.data.conventions import LAYOUTS
from vi_seg_jax.io.nifti import write_nifti

SHAPE = (6, 7, 5)
AFFINE = np.array(
    [[-1.0, 0, 0, 90], [0, -1.0, 0, 120], [0, 0, 1.0, -70], [0, 0, 0, 1]], dtype=np.float64
)


def canonical_label(shape=SHAPE) -> np.ndarray:
    label = np.zeros(shape, dtype=np.uint8)
    label[1:5, 1:6, 1:4] = 2  # edema
    label[2:4, 2:5, 2:3] = 1  # core
    label[3, 3, 2] = 3  # enhancing
    return label


def brain_image(shape=SHAPE, value=1.0) -> np.ndarray:
    """A non-zero block (the 'brain') with a ramp inside, zero at the border."""
    ramp = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) / 100
    image = np.zeros(shape, dtype=np.float32)
    image[1:-1, 1:-1, 1:-1] = value + ramp[1:-1, 1:-1, 1:-1]
    return image


def write_case(root: Path, layout_name: str, case_id: str, *, with_label=True, shape=SHAPE) -> Path:
    """Writes one small case in `layout_name`'s naming; returns its folder."""
    layout = LAYOUTS[layout_name]
    label = layout.convention.from_canonical(canonical_label(shape))
    if layout_name == "msd":
        image = np.stack([brain_image(shape, 10.0 * (c + 1)) for c in range(4)], axis=-1)
        write_nifti(root / "imagesTr" / f"{case_id}.nii.gz", image, affine=AFFINE)
        if with_label:
            write_nifti(root / "labelsTr" / f"{case_id}.nii.gz", label, affine=AFFINE, kind="label")
        return root / "imagesTr"
    folder = root / case_id
    sep = layout.separator
    for index, suffix in enumerate(layout.modality_suffixes.values()):
        write_nifti(
            folder / f"{case_id}{sep}{suffix}.nii.gz",
            brain_image(shape, 10.0 * (index + 1)),
            affine=AFFINE,
        )
    if with_label:
        write_nifti(folder / f"{case_id}{sep}seg.nii.gz", label, affine=AFFINE, kind="label")
    return folder


CASE_IDS = {
    "brats2018": [
        "HGG/Brats18_TCIA01_0001_1",
        "HGG/Brats18_TCIA01_0002_1",
        "LGG/Brats18_TCIA09_0003_1",
    ],
    "brats2020": ["BraTS20_Training_001", "BraTS20_Training_002", "BraTS20_Training_003"],
    "brats2021": ["BraTS2021_00000", "BraTS2021_00002", "BraTS2021_00003"],
    "brats2023": ["BraTS-GLI-00000-000", "BraTS-GLI-00002-000", "BraTS-GLI-00003-001"],
    "msd": ["BRATS_001", "BRATS_002", "BRATS_003"],
}


def write_dataset(root: Path, layout_name: str) -> Path:
    for case_id in CASE_IDS[layout_name]:
        if "/" in case_id:
            group, name = case_id.split("/")
            write_case(root / group, layout_name, name)
        else:
            write_case(root, layout_name, case_id)
    return root
