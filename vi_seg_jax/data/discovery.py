"""Finding BraTS cases on disk, whatever release laid them out.

`discover_cases(data_dir)` recognises, and reports which it found:

- `brats2018`: BraTS 2018/2019, `HGG/` and `LGG/` folders of
  `<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz`;
- `brats2020`: `BraTS20_Training_001/BraTS20_Training_001_{...}.nii[.gz]`;
- `brats2021`: `BraTS2021_00000/BraTS2021_00000_{...}.nii.gz` (also any other case
  folder named the 2018-2021 way);
- `brats2023`: BraTS 2023/2024 GLI, `BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz`;
- `msd`: Medical Segmentation Decathlon Task01, `imagesTr/BRATS_001.nii.gz` (4D) with
  `labelsTr/BRATS_001.nii.gz`, and `imagesTs/` without labels.

`data_dir` may also be a single case folder. Cases without a label file are valid
(for prediction); training asks for labels with `require_labels=True`.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

from vi_seg_jax.data.conventions import LAYOUTS, MODALITIES, LabelConvention, Layout
from vi_seg_jax.errors import DataError
from vi_seg_jax.io.nifti import is_nifti, nifti_stem

_EXPECTED = (
    "expected BraTS case folders (<case>/<case>_t1.nii.gz ..., BraTS 2018-2021), "
    "HGG/ and LGG/ folders (BraTS 2018/2019), <case>/<case>-t1n.nii.gz ... (BraTS 2023+), "
    "or imagesTr/ and labelsTr/ (MSD Task01)"
)


class BadCaseWarning(UserWarning):
    """A case was skipped because it failed validation (`skip_bad=True`)."""


@dataclasses.dataclass(frozen=True)
class CaseFiles:
    """The files of one case.

    Attributes:
      case_id: the case folder's name (MSD: the image file's stem).
      layout: the release layout it was found in.
      images: canonical modality -> file. For `msd` every modality maps to the same
        4D file and `layout.modality_suffixes[modality]` is its channel index.
      label: the segmentation file, or None for an inference-only case.
    """

    case_id: str
    layout: Layout
    images: dict[str, Path]
    label: Path | None

    @property
    def convention(self) -> LabelConvention:
        return self.layout.convention

    @property
    def folder(self) -> Path:
        return next(iter(self.images.values())).parent

    def channel_index(self, modality: str) -> int | None:
        """Channel of `modality` in a 4D (MSD) image, None for one file per modality."""
        index = self.layout.modality_suffixes[modality]
        return index if isinstance(index, int) else None


@dataclasses.dataclass(frozen=True)
class Dataset:
    """The cases found under one folder, all of one layout."""

    root: Path
    layout: Layout
    cases: tuple[CaseFiles, ...]
    skipped: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.cases)

    @property
    def num_labelled(self) -> int:
        return sum(case.label is not None for case in self.cases)

    def summary(self) -> str:
        text = (
            f"{self.root}: {len(self.cases)} cases in layout {self.layout.name} "
            f"({self.layout.description}), {self.num_labelled} with labels, "
            f"label convention {self.layout.convention.name}"
        )
        if self.skipped:
            text += f", {len(self.skipped)} skipped"
        return text


def discover_cases(
    data_dir: str | Path,
    *,
    modalities: Sequence[str] = MODALITIES,
    require_labels: bool = False,
    skip_bad: bool = False,
) -> Dataset:
    """Finds every case under `data_dir` and the layout it uses.

    Args:
      data_dir: a dataset folder of any supported layout, or one case folder.
      modalities: canonical modalities every case must have.
      require_labels: whether a case without a segmentation file is an error.
      skip_bad: skip (with a `BadCaseWarning`) cases that are incomplete instead of
        raising.

    Returns:
      The cases, sorted by case id.

    Raises:
      DataError: missing, empty or unrecognisable folder, mixed layouts, or an
        incomplete case (unless `skip_bad`); the message names the path.
    """
    root = Path(data_dir)
    if not root.exists():
        raise DataError(root, "folder not found")
    if not root.is_dir():
        raise DataError(root, f"expected a folder, got a file; {_EXPECTED}")
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise DataError(root, f"empty folder; {_EXPECTED}")

    unnamed: list[Path] = []
    if (root / "imagesTr").is_dir() or (root / "imagesTs").is_dir():
        candidates = _msd_cases(root)
    elif (root / "HGG").is_dir() or (root / "LGG").is_dir():
        folders = [
            f
            for group in ("HGG", "LGG")
            if (root / group).is_dir()
            for f in _subfolders(root / group)
        ]
        candidates = [_folder_case(folder, forced_layout="brats2018") for folder in folders]
        unnamed = [folder for folder, case in zip(folders, candidates, strict=True) if case is None]
    elif _folder_case(root) is not None:
        candidates = [_folder_case(root)]
    else:
        folders = _subfolders(root)
        candidates = [_folder_case(folder) for folder in folders]
        unnamed = [folder for folder, case in zip(folders, candidates, strict=True) if case is None]

    candidates = [case for case in candidates if case is not None]
    if not candidates:
        raise DataError(root, f"no recognisable BraTS layout; {_EXPECTED}")
    layout = _single_layout(root, candidates)
    # Case folders holding NIfTI files named some other way are bad cases, not noise.
    problems = [
        DataError(folder, f"NIfTI files not named {folder.name}{layout.separator}<modality>.nii.gz")
        for folder in unnamed
        if _nifti_files(folder)
    ]

    cases, skipped = [], []
    for candidate in sorted(candidates, key=lambda c: c.case_id) + problems:
        try:
            if isinstance(candidate, DataError):
                raise candidate
            cases.append(_complete_case(candidate, modalities, require_labels))
        except DataError as error:
            if not skip_bad:
                raise
            skipped.append(str(error))
            warnings.warn(f"{error}; skipping this case", BadCaseWarning, stacklevel=2)
    if not cases:
        raise DataError(root, f"no usable case ({len(skipped)} skipped)")
    return Dataset(root=root, layout=layout, cases=tuple(cases), skipped=tuple(skipped))


@dataclasses.dataclass(frozen=True)
class _Candidate:
    case_id: str
    folder: Path
    layout: Layout
    files: dict[str, Path]  # lower-case suffix (or "image"/"seg" for MSD) -> file


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and is_nifti(p) and not p.name.startswith(".")
    )


def _year_layout(case_id: str, separator: str) -> str:
    if separator == "-":
        return "brats2023"
    if re.match(r"brats20_", case_id, re.IGNORECASE):
        return "brats2020"
    if re.match(r"brats_?(18|19|2018|2019)", case_id, re.IGNORECASE):
        return "brats2018"
    return "brats2021"


def _folder_case(folder: Path, forced_layout: str | None = None) -> _Candidate | None:
    """A case folder holds `<folder name><sep><suffix>.nii[.gz]` files; None otherwise."""
    case_id = folder.name
    for separator in ("_", "-"):
        prefix = f"{case_id}{separator}".lower()
        files = {
            nifti_stem(path)[len(prefix) :].lower(): path
            for path in _nifti_files(folder)
            if nifti_stem(path).lower().startswith(prefix)
        }
        known = {str(s) for layout in LAYOUTS.values() for s in layout.modality_suffixes.values()}
        if files.keys() & known:
            layout = LAYOUTS[forced_layout or _year_layout(case_id, separator)]
            return _Candidate(case_id, folder, layout, _with_odd_label_name(folder, files))
    return None


def _with_odd_label_name(folder: Path, files: dict[str, Path]) -> dict[str, Path]:
    """Accepts a lone `*seg*` file under another name (BraTS 2020 case 355 has one)."""
    if "seg" in files:
        return files
    odd = [p for p in _nifti_files(folder) if "seg" in p.name.lower() and p not in files.values()]
    return {**files, "seg": odd[0]} if len(odd) == 1 else files


def _msd_cases(root: Path) -> list[_Candidate]:
    layout = LAYOUTS["msd"]
    candidates = []
    for images_dir, labels_dir in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        if not (root / images_dir).is_dir():
            continue
        for image in _nifti_files(root / images_dir):
            files = {"image": image}
            label = (
                next(
                    (
                        p
                        for p in _nifti_files(root / labels_dir)
                        if nifti_stem(p) == nifti_stem(image)
                    ),
                    None,
                )
                if (root / labels_dir).is_dir()
                else None
            )
            if label is not None:
                files["seg"] = label
            candidates.append(_Candidate(nifti_stem(image), root / images_dir, layout, files))
    return candidates


def _single_layout(root: Path, candidates: list[_Candidate]) -> Layout:
    counts: dict[str, int] = {}
    for candidate in candidates:
        counts[candidate.layout.name] = counts.get(candidate.layout.name, 0) + 1
    if len(counts) > 1:
        found = ", ".join(f"{name} ({n} cases)" for name, n in sorted(counts.items()))
        raise DataError(root, f"mixed layouts {found}; put each release in its own folder")
    return candidates[0].layout


def _complete_case(
    candidate: _Candidate, modalities: Sequence[str], require_labels: bool
) -> CaseFiles:
    layout = candidate.layout
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; expected a subset of {list(MODALITIES)}")
    if layout.name == "msd":
        images = {m: candidate.files["image"] for m in modalities}
    else:
        images = {}
        for modality in modalities:
            suffix = str(layout.modality_suffixes[modality])
            if suffix not in candidate.files:
                expected = f"{candidate.case_id}{layout.separator}{suffix}.nii.gz"
                raise DataError(
                    candidate.folder, f"missing modality {modality!r} (expected {expected})"
                )
            images[modality] = candidate.files[suffix]
    label = candidate.files.get(layout.label_suffix)
    if label is None and require_labels:
        if layout.name == "msd":
            expected = f"labelsTr/{candidate.files['image'].name}"
        else:
            expected = f"{candidate.case_id}{layout.separator}{layout.label_suffix}.nii.gz"
        raise DataError(candidate.folder, f"missing segmentation (expected {expected})")
    return CaseFiles(case_id=candidate.case_id, layout=layout, images=images, label=label)
