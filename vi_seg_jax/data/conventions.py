"""Label and modality conventions of the BraTS releases and MSD Task01.

Every loader, target, metric and exporter goes through this one layer, so a label
value never has a meaning outside it. Inside vi_seg_jax labels are *canonical
classes*:

  0 background, 1 necrotic / non-enhancing tumour core, 2 edema,
  3 enhancing tumour, 4 resection cavity (BraTS 2024 post-treatment only).

Regions (BraTS evaluation): WT = {1, 2, 3}, TC = {1, 3}, ET = {3}. The resection
cavity belongs to no tumour region.
"""

from __future__ import annotations

import dataclasses

import numpy as np

BACKGROUND, CORE, EDEMA, ENHANCING, RESECTION_CAVITY = 0, 1, 2, 3, 4
CANONICAL_CLASS_NAMES = ("background", "necrotic_core", "edema", "enhancing", "resection_cavity")

REGION_NAMES = ("wt", "tc", "et")
REGION_CLASSES = {
    "wt": (CORE, EDEMA, ENHANCING),
    "tc": (CORE, ENHANCING),
    "et": (ENHANCING,),
}

MODALITIES = ("t1", "t1ce", "t2", "flair")


@dataclasses.dataclass(frozen=True)
class LabelConvention:
    """How one release writes labels.

    Attributes:
      name: identifier used in manifests and messages.
      to_canonical_map: release label value -> canonical class.
    """

    name: str
    to_canonical_map: dict[int, int]

    @property
    def release_labels(self) -> tuple[int, ...]:
        return tuple(sorted(self.to_canonical_map))

    @property
    def from_canonical_map(self) -> dict[int, int]:
        return {canonical: release for release, canonical in self.to_canonical_map.items()}

    def to_canonical(self, labels: np.ndarray) -> np.ndarray:
        """Release labels -> canonical classes (uint8). Unknown values raise ValueError."""
        values = np.asarray(labels)
        unexpected = self.unexpected_values(values)
        if unexpected:
            raise ValueError(
                f"unexpected label values {unexpected}; {self.name} uses {list(self.release_labels)}"
            )
        lookup = np.zeros(max(self.to_canonical_map) + 1, dtype=np.uint8)
        for release, canonical in self.to_canonical_map.items():
            lookup[release] = canonical
        return lookup[values.astype(np.int64)]

    def from_canonical(self, classes: np.ndarray) -> np.ndarray:
        """Canonical classes -> this release's label values (uint8), for writing outputs."""
        classes = np.asarray(classes)
        inverse = self.from_canonical_map
        missing = sorted(set(np.unique(classes).tolist()) - set(inverse))
        if missing:
            names = [CANONICAL_CLASS_NAMES[c] if 0 <= c < 5 else str(c) for c in missing]
            raise ValueError(f"{self.name} has no label for canonical classes {names}")
        lookup = np.zeros(max(inverse) + 1, dtype=np.uint8)
        for canonical, release in inverse.items():
            lookup[canonical] = release
        return lookup[classes.astype(np.int64)]

    def unexpected_values(self, labels: np.ndarray) -> list[float]:
        """Sorted values in `labels` that this convention does not define."""
        values = np.unique(np.asarray(labels))
        allowed = np.asarray(self.release_labels)
        return [v.item() for v in values if not np.isin(v, allowed) or v != np.rint(v)]


BRATS_2018_2021 = LabelConvention("brats2018-2021", {0: 0, 1: CORE, 2: EDEMA, 4: ENHANCING})
BRATS_2023 = LabelConvention(
    "brats2023", {0: 0, 1: CORE, 2: EDEMA, 3: ENHANCING, 4: RESECTION_CAVITY}
)
MSD_TASK01 = LabelConvention("msd-task01", {0: 0, 1: EDEMA, 2: CORE, 3: ENHANCING})

CONVENTIONS = {c.name: c for c in (BRATS_2018_2021, BRATS_2023, MSD_TASK01)}


@dataclasses.dataclass(frozen=True)
class Layout:
    """A release's folder and file naming.

    Attributes:
      name: `brats2018`, `brats2020`, `brats2021`, `brats2023` or `msd`.
      description: what a person calls it.
      convention: its label convention.
      modality_suffixes: canonical modality -> the file suffix the release uses
        (for `msd`: the channel index in the 4D image).
      separator: between case id and suffix in file names.
    """

    name: str
    description: str
    convention: LabelConvention
    modality_suffixes: dict[str, str | int]
    separator: str = "_"
    label_suffix: str = "seg"


_BRATS_SUFFIXES = {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}

LAYOUTS = {
    layout.name: layout
    for layout in (
        Layout(
            "brats2018", "BraTS 2018/2019 (HGG/ and LGG/ folders)", BRATS_2018_2021, _BRATS_SUFFIXES
        ),
        Layout("brats2020", "BraTS 2020 (BraTS20_Training_XXX)", BRATS_2018_2021, _BRATS_SUFFIXES),
        Layout("brats2021", "BraTS 2021 (BraTS2021_XXXXX)", BRATS_2018_2021, _BRATS_SUFFIXES),
        Layout(
            "brats2023",
            "BraTS 2023/2024 GLI (BraTS-GLI-XXXXX-XXX)",
            BRATS_2023,
            {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"},
            separator="-",
        ),
        Layout(
            "msd",
            "Medical Segmentation Decathlon Task01 (imagesTr/, labelsTr/, 4D images)",
            MSD_TASK01,
            {"flair": 0, "t1": 1, "t1ce": 2, "t2": 3},
        ),
    )
}


def get_layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout {name!r}; expected one of {sorted(LAYOUTS)}")
    return LAYOUTS[name]


def canonical_modality(name: str) -> str:
    """Maps any release's modality name (t1n, t1c, t2w, t2f, T1Gd, ...) to t1/t1ce/t2/flair."""
    aliases = {
        "t1": "t1", "t1n": "t1", "t1w": "t1", "native": "t1",
        "t1ce": "t1ce", "t1c": "t1ce", "t1gd": "t1ce", "t1post": "t1ce",
        "t2": "t2", "t2w": "t2",
        "flair": "flair", "t2f": "flair", "t2flair": "flair", "t2-flair": "flair",
    }  # fmt: skip
    key = name.strip().lower()
    if key not in aliases:
        raise ValueError(
            f"unknown modality {name!r}; expected one of {list(MODALITIES)} or an alias"
        )
    return aliases[key]


def regions_from_classes(classes: np.ndarray) -> np.ndarray:
    """Canonical classes [...] -> region masks [..., 3] (WT, TC, ET), bool."""
    classes = np.asarray(classes)
    return np.stack([np.isin(classes, REGION_CLASSES[r]) for r in REGION_NAMES], axis=-1)


def classes_from_regions(regions: np.ndarray) -> np.ndarray:
    """Region masks [..., 3] (WT, TC, ET) -> canonical classes (uint8).

    Nested decoding as in BraTS submissions: ET wins, then the rest of TC is the
    necrotic core, then the rest of WT is edema. A TC or ET voxel outside WT still
    counts as tumour (the regions are forced to nest).
    """
    regions = np.asarray(regions, dtype=bool)
    wt, tc, et = regions[..., 0], regions[..., 1], regions[..., 2]
    classes = np.zeros(regions.shape[:-1], dtype=np.uint8)
    classes[wt | tc | et] = EDEMA
    classes[tc | et] = CORE
    classes[et] = ENHANCING
    return classes
