"""BraTS data: layouts, label conventions, validation, preprocessing, sampling, splits."""

from vi_seg_jax.data.cache import PreparedCase, prepare_case, prepare_dataset
from vi_seg_jax.data.conventions import (
    LAYOUTS,
    MODALITIES,
    REGION_NAMES,
    LabelConvention,
    Layout,
    classes_from_regions,
    regions_from_classes,
)
from vi_seg_jax.data.discovery import BadCaseWarning, CaseFiles, Dataset, discover_cases
from vi_seg_jax.data.loading import CaseVolumes, load_case
from vi_seg_jax.data.preprocess import (
    GridMapping,
    PreprocessConfig,
    Preprocessed,
    preprocess,
    to_original_grid,
    to_preprocessed_grid,
)
from vi_seg_jax.data.sampler import Batch, PatchSampler
from vi_seg_jax.data.splits import Splits, make_splits

__all__ = [
    "LAYOUTS",
    "MODALITIES",
    "REGION_NAMES",
    "BadCaseWarning",
    "Batch",
    "CaseFiles",
    "CaseVolumes",
    "Dataset",
    "GridMapping",
    "LabelConvention",
    "Layout",
    "PatchSampler",
    "PreparedCase",
    "PreprocessConfig",
    "Preprocessed",
    "Splits",
    "classes_from_regions",
    "discover_cases",
    "load_case",
    "make_splits",
    "prepare_case",
    "prepare_dataset",
    "preprocess",
    "regions_from_classes",
    "to_original_grid",
    "to_preprocessed_grid",
]
