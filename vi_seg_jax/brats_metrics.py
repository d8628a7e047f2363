"""Lesion-wise BraTS metrics, computed by the challenge organisers' package (BraTS-evaluation).

Since 2023 BraTS scores each connected lesion, not only the whole-volume overlap. The official
implementation is `BraTS-evaluation` (PyPI `brats-evaluation`, github.com/BraTS/BraTS_evaluation,
"Official package to compute metrics for the BraTS segmentation challenges"): one Panoptica
configuration per challenge (`gli`, `mets`, `ped`, `MenRT`, `MenPre`, `GoAT`), run by
`panoptica.Panoptica_Evaluator`. Nothing here re-implements a metric: this module chooses the
configuration, calls the evaluator on the two files and renames its outputs. It is the only
module that imports the package, lazily; without it `MissingBratsMetrics` says how to install
it (`pip install -e ".[brats]"`).

Configuration per label convention (`vi_seg_jax.data.conventions`):

- BraTS 2023+ (labels 1 NETC, 2 SNFH, 3 ET, 4 RC): the bundled `gli` configuration, verbatim.
- BraTS 2018-2021 (1, 2, 4) and MSD Task01 (1 edema, 2 core, 3 ET): no bundled configuration
  fits (in `gli`, 4 is the resection cavity and 3 is ET), so `gli` with only its label groups
  rewritten from the convention (WT, TC, ET from `REGION_CLASSES`; for 2018-2021:
  ET {4}, TC {1, 4}, WT {1, 2, 4}). Matching, metrics and edge cases stay `gli`'s.

Only the run's regions are evaluated (`gli`'s NETC, SNFH and RC groups are skipped): WT, TC, ET
for a `regions` run, WT alone for a `wt` run, whose `_seg` is a 0/1 whole-tumour mask (label 1
lies in every convention's WT group; TC and ET cannot be read off such a mask).

Per region, the columns (`BRATS_METRICS`) and the package's keys they hold:

- `lesion_dice` = `sq_dsc`: mean Dice over the *matched* lesions. This is what the package's
  own report (`brats-parse-metrics seg`) calls `lesionwise_dsc_mean`. A missed or spurious
  lesion does not lower it; it lowers `lesion_pq`.
- `lesion_pq` = `pq_dsc`: panoptic quality, `sq_dsc` times the recognition quality
  TP / (TP + (FP + FN) / 2). With a missed lesion it is below `lesion_dice`.
- `lesion_hd95` = `sq_hd95` (mm, over matched lesions) and `lesion_nsd` = `sq_nsd` (the
  package's normalised surface Dice at a tolerance of the smallest voxel spacing: 1 mm on the
  BraTS grid).
- `lesion_tp`, `lesion_fp`, `lesion_fn`: matched, spurious and missed lesions (connected
  components, paired one-to-one by maximum bipartite matching on Dice, threshold 1e-6).

Edge cases are the configuration's: no matched lesion while either side has one gives Dice,
NSD and PQ 0 and HD95 infinity, which is reported as `metrics.HD95_CAP` (the cap of every HD95
in this project; the package's report writes 373 for its global HD95); neither side having a
lesion gives NaN (`evaluation.summarize` leaves NaNs out of the means).

The files are read with nibabel and handed to the package as images (its nibabel input path).
Given paths it reads them with SimpleITK and pairs SimpleITK's (x, y, z) spacing with the
(z, y, x) array, which swaps the axes' spacing on anisotropic grids (measured with panoptica
2.1.7); on BraTS's 1 mm isotropic grid both give the same numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import sys
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

from vi_seg_jax.data.conventions import BRATS_2023, REGION_CLASSES, LabelConvention
from vi_seg_jax.errors import DataError, first_line
from vi_seg_jax.io.folders import write_text_atomic
from vi_seg_jax.metrics import HD95_CAP

INSTALL_HINT = 'pip install -e ".[brats]"'

# Column name -> the key of the package's per-region result (`PanopticaResult.to_dict`).
PACKAGE_KEYS = {
    "lesion_dice": "sq_dsc",
    "lesion_hd95": "sq_hd95",
    "lesion_nsd": "sq_nsd",
    "lesion_pq": "pq_dsc",
    "lesion_tp": "tp",
    "lesion_fp": "fp",
    "lesion_fn": "fn",
}
BRATS_METRICS = tuple(PACKAGE_KEYS)

# The bundled configuration of the adult glioma challenge (BraTS 2023+ GLI labels).
CONFIG_NAME = "gli"


class MissingBratsMetrics(ImportError):
    """The official package is not installed; the message is one line saying how to."""


def _import():
    """(brats_evaluation, panoptica), or MissingBratsMetrics."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            import brats_evaluation
            import panoptica
    except ImportError as error:
        raise MissingBratsMetrics(
            "the lesion-wise BraTS metrics need the official BraTS-evaluation package "
            f"(not installed: {error.name or first_line(error)}); {INSTALL_HINT}"
        ) from error
    return brats_evaluation, panoptica


@contextlib.contextmanager
def _quiet():
    """Hides the package's notes while configuring: its print that `gli`'s groups share
    labels (they do on purpose: TC and WT merge NETC, SNFH and ET) and its config-saved log."""
    log = logging.getLogger("panoptica")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        log.setLevel(level)


def package_versions() -> dict[str, str]:
    """Installed versions of the package and of panoptica, which computes the metrics."""
    _import()
    return {name: metadata.version(name) for name in ("brats-evaluation", "panoptica")}


def label_groups(convention: LabelConvention, regions: tuple[str, ...]) -> dict[str, list[int]]:
    """Region -> the release label values it merges, e.g. brats2018-2021 ET -> [4]."""
    inverse = convention.from_canonical_map
    return {region: sorted(inverse[c] for c in REGION_CLASSES[region]) for region in regions}


@dataclasses.dataclass(frozen=True)
class BratsScorer:
    """The package's evaluator for one label convention, restricted to `regions`.

    Attributes:
      convention: the label convention of the prediction and ground-truth files.
      regions: the regions scored (`wt`, `tc`, `et`; the evaluator's other groups are skipped).
      evaluator: the `panoptica.Panoptica_Evaluator` built from the configuration.
      config: how it was configured, in words.
    """

    convention: LabelConvention
    regions: tuple[str, ...]
    evaluator: Any
    config: str

    @property
    def skipped_groups(self) -> list[str]:
        """The configuration's groups that are not `regions` (`gli`: NETC, SNFH, RC)."""
        names = self.evaluator.segmentation_class_groups_names
        return [g for g in names if g not in self.regions]

    def save_config(self, path: str | Path) -> Path:
        """Writes the evaluator's configuration (panoptica YAML, loadable with
        `Panoptica_Evaluator.load_from_config`) to `path`, under a comment naming the
        package versions and `config`."""
        path = Path(path)
        with _quiet():
            self.evaluator.save_to_config(path)
        versions = ", ".join(f"{name} {v}" for name, v in package_versions().items())
        header = f"# {versions}; {self.config}; regions {', '.join(self.regions)}\n"
        write_text_atomic(path, header + path.read_text())
        return path

    def raw(self, prediction: str | Path, truth: str | Path) -> dict[str, dict[str, Any]]:
        """The package's result per region (`PanopticaResult.to_dict()`) for two label files.

        Raises:
          DataError: the package refused the pair (grids or headers differ, labels outside
            the configuration); the message names the prediction file.
        """
        import nibabel as nib

        prediction, truth = Path(prediction), Path(truth)
        try:
            # stdout: the table of `experiments.evaluate`; the package's citation request
            # (printed once) goes to stderr.
            with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
                # Integer-valued float label files (some releases store them so) are fine.
                warnings.filterwarnings("ignore", "The input arrays are not of integer type")
                # Raised on every call by the global NSD, which the configuration computes
                # in voxels with a 0.5-voxel tolerance; it is not reported here.
                warnings.filterwarnings("ignore", "The threshold is set to 0.5")
                results = self.evaluator.evaluate(
                    nib.load(prediction), nib.load(truth), skip_groups=self.skipped_groups
                )
        except (ValueError, TypeError) as error:
            raise DataError(
                prediction,
                f"the BraTS-evaluation package refused it against {truth.name}: "
                f"{first_line(error)}",
            ) from error
        return {region: results[region].to_dict() for region in self.regions}

    def score(self, prediction: str | Path, truth: str | Path) -> dict[str, dict[str, float]]:
        """Region -> `BRATS_METRICS` -> value (HD95 infinity as `HD95_CAP`, see the module)."""
        return {
            region: to_columns(result) for region, result in self.raw(prediction, truth).items()
        }


def to_columns(result: dict[str, Any]) -> dict[str, float]:
    """One region's package result -> `BRATS_METRICS` (NaN where the package gave none)."""
    values = {}
    for column, key in PACKAGE_KEYS.items():
        value = result.get(key)
        value = math.nan if value is None else float(value)
        if column == "lesion_hd95" and math.isinf(value):
            value = HD95_CAP
        values[column] = value
    return values


def scorer_for(convention: LabelConvention, regions: tuple[str, ...]) -> BratsScorer:
    """The release's configuration (see the module docstring) restricted to `regions`.

    Raises:
      MissingBratsMetrics: the package is not installed.
      ValueError: a region that is not WT, TC or ET.
    """
    unknown = [r for r in regions if r not in REGION_CLASSES]
    if unknown:
        raise ValueError(f"unknown regions {unknown}; expected some of {list(REGION_CLASSES)}")
    brats_evaluation, panoptica = _import()
    with _quiet():
        evaluator = panoptica.Panoptica_Evaluator.load_from_config(
            str(brats_evaluation.config_path(CONFIG_NAME))
        )
        if convention.name == BRATS_2023.name:
            return BratsScorer(convention, tuple(regions), evaluator, f"bundled {CONFIG_NAME!r}")
        evaluator = _with_label_groups(panoptica, evaluator, label_groups(convention, regions))
    described = f"bundled {CONFIG_NAME!r}, label groups of {convention.name}"
    return BratsScorer(convention, tuple(regions), evaluator, described)


def _with_label_groups(panoptica, evaluator, groups: dict[str, list[int]]):
    """`evaluator`'s configuration with its label groups replaced by `groups`."""
    from panoptica.utils import LabelGroup, LabelMergeGroup, SegmentationClassGroups

    kwargs = type(evaluator)._yaml_repr(evaluator)  # the constructor's arguments
    kwargs["segmentation_class_groups"] = SegmentationClassGroups(
        {
            name: (LabelMergeGroup if len(labels) > 1 else LabelGroup)(labels, False)
            for name, labels in groups.items()
        }
    )
    return panoptica.Panoptica_Evaluator(**kwargs)
