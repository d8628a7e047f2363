"""A cache of preprocessed cases, so that loading never bottlenecks training.

Each case is stored as `.npy` arrays next to a `meta.json` holding its `GridMapping`,
affine and a key: a hash of the source files' paths, sizes and modification times,
the modalities and the preprocessing settings. A cached case is reused while its key
matches and rebuilt otherwise; arrays are opened memory-mapped, so a sampler slices
patches without reading whole volumes. Every case folder is written under a temporary
name and renamed into place, so an interrupted run never leaves a half-written entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from vi_seg_jax.data.discovery import BadCaseWarning, CaseFiles, Dataset
from vi_seg_jax.data.loading import load_case
from vi_seg_jax.data.preprocess import GridMapping, PreprocessConfig, preprocess
from vi_seg_jax.errors import DataError
from vi_seg_jax.io.folders import cache_root, replace_folder

CACHE_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PreparedCase:
    """A preprocessed case, arrays memory-mapped from the cache.

    Attributes:
      case_id: as discovered.
      image: [X', Y', Z', C] float32, normalised, channels in `modalities` order.
      label: [X', Y', Z'] uint8 canonical classes, or None.
      mask: [X', Y', Z'] bool brain mask.
      mapping: how to map predictions back onto the source grid.
      affine: [4, 4] source affine.
      files: the source files (their header is copied when writing outputs).
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    mask: np.ndarray
    mapping: GridMapping
    affine: np.ndarray
    files: CaseFiles


def default_cache_dir(data_dir: str | Path) -> Path:
    """Where the preprocessed copy of `data_dir` lives by default."""
    resolved = str(Path(data_dir).resolve())
    digest = hashlib.sha256(resolved.encode()).hexdigest()[:12]
    return cache_root() / "preprocessed" / f"{Path(resolved).name}-{digest}"


def case_key(case: CaseFiles, modalities: Sequence[str], config: PreprocessConfig) -> str:
    """Changes whenever a source file, the modalities or the preprocessing change."""
    files = sorted({*case.images.values(), *([case.label] if case.label else [])})
    stats = []
    for path in files:
        stat = path.stat()
        stats.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    record = {
        "format": CACHE_FORMAT_VERSION,
        "case_id": case.case_id,
        "files": stats,
        "modalities": list(modalities),
        "preprocess": dataclasses.asdict(config),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def prepare_case(
    case: CaseFiles,
    cache_dir: str | Path,
    *,
    modalities: Sequence[str],
    config: PreprocessConfig,
) -> PreparedCase:
    """Returns the cached preprocessed case, building it first if it is missing or stale."""
    folder = Path(cache_dir) / case.case_id
    key = case_key(case, modalities, config)
    if _read_meta(folder).get("key") != key:
        _build(case, folder, key, modalities, config)
    return _open(case, folder)


def prepare_dataset(
    dataset: Dataset,
    cache_dir: str | Path | None = None,
    *,
    modalities: Sequence[str],
    config: PreprocessConfig,
    skip_bad: bool = False,
    progress: bool = False,
) -> list[PreparedCase]:
    """Validates, preprocesses and caches every case of `dataset`.

    Args:
      dataset: from `discover_cases`.
      cache_dir: cache folder; `default_cache_dir(dataset.root)` when None.
      modalities: canonical modalities, in channel order.
      config: preprocessing settings.
      skip_bad: warn about and leave out cases that fail validation instead of raising.
      progress: show a progress bar (on a terminal only).

    Returns:
      The prepared cases, in the dataset's order.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(dataset.root)
    prepared = []
    for case in tqdm(
        dataset.cases, desc="preparing cases", unit="case", disable=None if progress else True
    ):
        try:
            prepared.append(prepare_case(case, cache_dir, modalities=modalities, config=config))
        except DataError as error:
            if not skip_bad:
                raise
            warnings.warn(f"{error}; skipping this case", BadCaseWarning, stacklevel=2)
    if not prepared:
        raise DataError(dataset.root, "no case passed validation")
    return prepared


def _read_meta(folder: Path) -> dict:
    try:
        return json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return {}


def _build(
    case: CaseFiles, folder: Path, key: str, modalities: Sequence[str], config: PreprocessConfig
) -> None:
    volumes = load_case(case, modalities)
    try:
        result = preprocess(volumes.image, volumes.label, config)
    except ValueError as error:
        raise DataError(case.folder, str(error)) from None
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{case.case_id}.", dir=folder.parent))
    try:
        np.save(staging / "image.npy", result.image.astype(np.float32))
        np.save(staging / "mask.npy", result.mask)
        if result.label is not None:
            np.save(staging / "label.npy", result.label.astype(np.uint8))
        meta = {
            "key": key,
            "case_id": case.case_id,
            "modalities": list(modalities),
            "mapping": result.mapping.to_dict(),
            "affine": volumes.affine.tolist(),
            "has_label": result.label is not None,
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=1))
        replace_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _open(case: CaseFiles, folder: Path) -> PreparedCase:
    meta = _read_meta(folder)
    label = np.load(folder / "label.npy", mmap_mode="r") if meta["has_label"] else None
    return PreparedCase(
        case_id=case.case_id,
        image=np.load(folder / "image.npy", mmap_mode="r"),
        label=label,
        mask=np.load(folder / "mask.npy", mmap_mode="r"),
        mapping=GridMapping.from_dict(meta["mapping"]),
        affine=np.asarray(meta["affine"], dtype=np.float64),
        files=case,
    )
