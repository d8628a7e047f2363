"""Scores a prediction folder (`experiments.predict` output) against ground truth.

Per case and region (WT for a `wt` model; WT, TC, ET for a `regions` model): Dice and IoU
(the paper's, from the confusion counts), HD95 in mm (voxel spacing from the header; an
empty prediction against a non-empty truth, or the reverse, scores `metrics.HD95_CAP`),
calibration inside the brain mask (ECE with 15 bins, Brier, NLL) of the calibrated
`_prob` maps and the ECE of the Monte Carlo mean before the temperature
(`ece_uncalibrated`, from `_prob_uncalibrated`, written when a temperature was applied),
and the QU-BraTS 2020 score of the `_unc_<region>` maps (the official scorer's definition:
41 thresholds, true positives and negatives counted inside the brain). The brain is where any
modality is non-zero, except for QU-BraTS and the uncertainty-against-error metrics below,
which take T1 > 0 when the case has a T1: the mask the official scorer uses when given the
T1 image, its documented stand-in for a brain mask, so that its numbers and these agree.

Whether the uncertainty points at the errors, from the same `_unc_<region>` map read as
u = map / 100 ∈ [0, 1] (the binary entropy in bits of the calibrated probability), inside
that brain: `error_auroc`, the AUROC of u as a detector of the misclassified voxels
(`metrics.error_detection_auroc`); `ueo`, the uncertainty-error overlap (Jungo & Reyes 2019)
at the case's best threshold of `metrics.UEO_THRESHOLDS` (the whole curve is in
`CaseScores.ueo_curves` and `ueo_curves.csv`); `mean_uncertainty`, the mean of u. Over the
cases (`uncertainty_summary`, `uncertainty.json`): the UEO at the one threshold that
maximises the mean curve, as Jungo & Reyes report it per method, and the Spearman
correlation between the cases' mean uncertainty and their Dice (failure detection: a useful
uncertainty gives ρ near −1).

With `brats_metrics=True`, also the lesion-wise BraTS metrics per region (`BRATS_METRICS`:
lesion-wise Dice, HD95, NSD, panoptic quality, matched / spurious / missed lesions), computed
by the challenge organisers' package on the written `_seg` file against the ground-truth file
with the release's configuration; see `vi_seg_jax.brats_metrics`.

`evaluate_folder` scores every case of a folder and writes the per-case table, the summary
and the plots; `experiments.evaluate` is its command line.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from vi_seg_jax.brats_metrics import BRATS_METRICS, BratsScorer, scorer_for
from vi_seg_jax.data.conventions import regions_from_classes
from vi_seg_jax.data.discovery import CaseFiles, discover_cases
from vi_seg_jax.data.loading import load_case
from vi_seg_jax.data.preprocess import brain_mask
from vi_seg_jax.errors import DataError
from vi_seg_jax.io.folders import write_csv_atomic, write_json_atomic, write_text_atomic
from vi_seg_jax.io.nifti import read_nifti
from vi_seg_jax.metrics import (
    UEO_THRESHOLDS,
    CalibrationBins,
    QUBraTS,
    best_uncertainty_error_overlap,
    brier_score,
    calibration_bins,
    dice,
    error_detection_auroc,
    expected_calibration_error,
    hd95,
    iou,
    mean_uncertainty,
    negative_log_likelihood,
    qubrats,
    spearman_correlation,
    uncertainty_error_overlap_curve,
)
from vi_seg_jax.task import get_task

METRICS = (
    "dice",
    "iou",
    "hd95",
    "ece",
    "ece_uncalibrated",
    "brier",
    "nll",
    "qubrats_dice_auc",
    "qubrats_ftp_auc",
    "qubrats_ftn_auc",
    "qubrats_score",
    "error_auroc",
    "ueo",
    "mean_uncertainty",
)
# The `_unc_<region>` maps hold 100 × binary entropy (bits); the metrics read it in [0, 1].
UNCERTAINTY_SCALE = 100.0


# The record of a prediction folder, rewritten after each case by `predict.predict_folder`.
PREDICTION_FILE = "prediction.json"


def prediction_record(
    *,
    checkpoint: str | Path,
    input_dir: str | Path,
    step: int,
    task: str,
    settings: dict,
    devices: int,
    temperature: dict[str, float],
    cases: list[str],
) -> dict[str, Any]:
    """The fields of `prediction.json` (`PredictionRun.read` reads them back).

    Args:
      checkpoint: the training workdir predicted with.
      input_dir: the case folder or dataset the cases came from (recorded absolute).
      step: the checkpoint step.
      task: `"wt"` or `"regions"`.
      settings: `Predictor.settings()`: samples, window, overlap and (when not none) tta.
      devices: devices the Monte Carlo samples were spread over.
      temperature: region -> temperature applied (1.0: none).
      cases: ids of the cases written so far, in order.
    """
    return {
        "checkpoint": str(checkpoint),
        "input": str(Path(input_dir).absolute()),
        "step": step,
        "task": task,
        "samples": settings["samples"],
        "window": settings["window"],
        "overlap": settings["overlap"],
        "tta": settings.get("tta", "none"),
        "devices": devices,
        "temperature": dict(temperature),
        "cases": list(cases),
    }


@dataclasses.dataclass(frozen=True)
class PredictionRun:
    """What `predict.predict_folder` recorded in `prediction.json` (`prediction_record`)."""

    folder: Path
    input: Path
    task: str
    temperature: dict[str, float]
    case_ids: tuple[str, ...]

    @property
    def regions(self) -> tuple[str, ...]:
        return get_task(self.task).regions

    @property
    def calibrated(self) -> bool:
        """Whether a temperature was applied (then `_prob_uncalibrated` holds p̄)."""
        return any(t != 1.0 for t in self.temperature.values())

    @classmethod
    def read(cls, folder: str | Path) -> PredictionRun:
        folder = Path(folder)
        record_path = folder / PREDICTION_FILE
        if not record_path.is_file():
            raise DataError(folder, f"not a prediction folder (no {PREDICTION_FILE})")
        record = json.loads(record_path.read_text())
        return cls(
            folder,
            Path(record["input"]),
            record["task"],
            record["temperature"],
            tuple(record["cases"]),
        )

    def path(self, case_id: str, suffix: str) -> Path:
        path = self.folder / f"{case_id}_{suffix}.nii.gz"
        if not path.is_file():
            raise DataError(path, "missing (written by experiments.predict)")
        return path


@dataclasses.dataclass(frozen=True)
class CaseScores:
    case_id: str
    values: dict[str, dict[str, float]]  # region -> metric -> value
    bins: dict[str, dict[str, CalibrationBins]]  # region -> "before"/"after" -> bins
    curves: dict[str, QUBraTS]  # region -> filtering curves
    # region -> [T] UEO at each of `UEO_THRESHOLDS` (u = map / 100, inside the T1 brain)
    ueo_curves: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def _read_on_grid(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    data = read_nifti(path).data
    if data.shape[:3] != shape:
        raise DataError(path, f"grid {data.shape[:3]} differs from the ground truth's {shape}")
    return data


def evaluate_case(
    run: PredictionRun, case: CaseFiles, *, brats: BratsScorer | None = None
) -> CaseScores:
    """All metrics of one case (truth and brain mask from its source files).

    Args:
      run: the prediction folder.
      case: the case's source files, with its ground truth.
      brats: also the lesion-wise BraTS metrics of the written `_seg` file against
        `case.label`, by this scorer (`brats_metrics.scorer_for(case.convention, run.regions)`).
    """
    modalities = tuple(case.images)
    volumes = load_case(case, modalities, with_label=True)
    shape = volumes.label.shape
    spacing = tuple(float(v) for v in np.linalg.norm(volumes.affine[:3, :3], axis=0))
    brain = brain_mask(volumes.image)
    qubrats_brain = volumes.image[..., modalities.index("t1")] > 0 if "t1" in modalities else brain
    truth = regions_from_classes(volumes.label)
    seg = _read_on_grid(run.path(case.case_id, "seg"), shape).astype(np.int16)
    predicted = get_task(run.task).predicted_regions(seg, case.convention)
    probs = _read_on_grid(run.path(case.case_id, "prob"), shape).reshape(*shape, -1)
    uncalibrated = probs
    if run.calibrated:
        path = run.path(case.case_id, "prob_uncalibrated")
        uncalibrated = _read_on_grid(path, shape).reshape(*shape, -1)
    values, bins, curves, ueo_curves = {}, {}, {}, {}
    for r, region in enumerate(run.regions):
        p, y, pred = probs[..., r], truth[..., r], predicted[..., r]
        before = uncalibrated[..., r]
        uncertainty = _read_on_grid(run.path(case.case_id, f"unc_{region}"), shape)
        curve = qubrats(pred, y, uncertainty, mask=qubrats_brain)
        u = uncertainty.astype(np.float64) / UNCERTAINTY_SCALE
        ueo_curves[region] = uncertainty_error_overlap_curve(
            u, pred, y, UEO_THRESHOLDS, mask=qubrats_brain
        )
        values[region] = {
            "dice": dice(pred, y),
            "iou": iou(pred, y),
            "hd95": hd95(pred, y, spacing),
            "ece": expected_calibration_error(p, y, brain),
            "ece_uncalibrated": expected_calibration_error(before, y, brain),
            "brier": brier_score(p, y, brain),
            "nll": negative_log_likelihood(p, y, brain),
            "qubrats_dice_auc": curve.dice_auc,
            "qubrats_ftp_auc": curve.ftp_auc,
            "qubrats_ftn_auc": curve.ftn_auc,
            "qubrats_score": curve.score,
            "error_auroc": error_detection_auroc(u, pred, y, mask=qubrats_brain),
            "ueo": best_uncertainty_error_overlap(ueo_curves[region], UEO_THRESHOLDS).ueo,
            "mean_uncertainty": mean_uncertainty(u, qubrats_brain),
        }
        bins[region] = {
            "before": calibration_bins(before, y, brain),
            "after": calibration_bins(p, y, brain),
        }
        curves[region] = curve
    if brats is not None:
        lesion_wise = brats.score(run.path(case.case_id, "seg"), case.label)
        for region in run.regions:
            values[region].update(lesion_wise[region])
    return CaseScores(case.case_id, values, bins, curves, ueo_curves)


def epistemic_away_from_abnormality(
    epistemic: np.ndarray, brain: np.ndarray, abnormal: np.ndarray, margin: int = 2
) -> float:
    """Mean epistemic variance over brain voxels more than `margin` voxels from `abnormal`.

    The out-of-distribution check's statistic. `abnormal` is the union of the annotated and
    the predicted lesion: the whole-brain mean is dominated by how much tumour boundary a
    case has (measured: in-domain tumours, being large, give a higher whole-brain mean than
    small out-of-domain lesions), while on the remaining tissue a model that knows what it
    has not seen is more uncertain on the other domain.
    """
    near = ndimage.binary_dilation(np.asarray(abnormal, bool), iterations=margin)
    keep = np.asarray(brain, bool) & ~near
    if not keep.any():
        raise ValueError("no brain voxels away from the abnormality")
    return float(np.mean(np.asarray(epistemic)[keep]))


def pool_bins(per_case: list[CalibrationBins]) -> CalibrationBins:
    """Reliability bins of the union of the cases' voxels."""
    counts = np.sum([b.counts for b in per_case], axis=0)

    def pooled(field: str) -> np.ndarray:
        weighted = [np.nan_to_num(getattr(b, field)) * b.counts for b in per_case]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, np.sum(weighted, axis=0) / counts, np.nan)

    return CalibrationBins(per_case[0].edges, counts, pooled("confidence"), pooled("accuracy"))


def mean_curves(per_case: list[QUBraTS]) -> QUBraTS:
    """QU-BraTS curves and scores averaged over cases (the challenge's ranking average)."""
    return QUBraTS(*(np.mean([getattr(c, f) for c in per_case], axis=0) for f in QUBraTS._fields))


def summarize(
    scores: list[CaseScores], regions: tuple[str, ...], metrics: tuple[str, ...] = METRICS
) -> dict[str, Any]:
    """Per region and metric: mean, std and count over the cases that have a value.

    A lesion-wise BraTS metric is NaN where neither the prediction nor the truth holds a lesion
    of the region (the package's definition): those cases are left out, n counts the others,
    and with none left mean and std are NaN. Any other metric's NaN stays in its mean.
    """
    summary: dict[str, Any] = {}
    for region in regions:
        summary[region] = {}
        for metric in metrics:
            values = np.array([s.values[region][metric] for s in scores], np.float64)
            if metric in BRATS_METRICS:
                values = values[~np.isnan(values)]
            empty = values.size == 0
            summary[region][metric] = {
                "mean": float("nan") if empty else float(np.mean(values)),
                "std": float("nan") if empty else float(np.std(values)),
                "n": int(values.size),
            }
    return summary


def uncertainty_summary(
    scores: list[CaseScores],
    regions: tuple[str, ...],
    thresholds: tuple[float, ...] = UEO_THRESHOLDS,
) -> dict[str, dict[str, Any]]:
    """Per region, the uncertainty statistics taken over the cases rather than averaged.

    Returns:
      region -> {"ueo": the mean UEO at the threshold maximising the mean of the cases'
      curves (Jungo & Reyes 2019's per-method number), "ueo_threshold": that threshold,
      "ueo_curve": [T] the mean curve, "thresholds": [T] the grid,
      "spearman_uncertainty_dice": Spearman ρ between the cases' `mean_uncertainty` and
      their `dice` (NaN with fewer than 2 cases, a constant input or a non-finite value),
      "n": the number of cases}.
    """
    summary: dict[str, dict[str, Any]] = {}
    for region in regions:
        curves = np.array([s.ueo_curves[region] for s in scores], np.float64)
        best = best_uncertainty_error_overlap(curves, thresholds)
        uncertainty = np.array([s.values[region]["mean_uncertainty"] for s in scores])
        dices = np.array([s.values[region]["dice"] for s in scores])
        finite = np.all(np.isfinite(uncertainty)) and np.all(np.isfinite(dices))
        rho = spearman_correlation(uncertainty, dices) if finite else float("nan")
        summary[region] = {
            "ueo": best.ueo,
            "ueo_threshold": best.threshold,
            "ueo_curve": [float(v) for v in curves.mean(axis=0)],
            "thresholds": [float(t) for t in thresholds],
            "spearman_uncertainty_dice": rho,
            "n": len(scores),
        }
    return summary


def write_ueo_curves_csv(path: Path, scores: list[CaseScores], regions: tuple[str, ...]) -> None:
    """One row per case: `case_id`, then `<region>_ueo_<t>` for each of `UEO_THRESHOLDS`
    (the thresholds the curves were computed at)."""
    columns = [f"{r}_ueo_{t:g}" for r in regions for t in UEO_THRESHOLDS]
    _write_case_rows(path, scores, columns, lambda s: [v for r in regions for v in s.ueo_curves[r]])


def uncertainty_markdown(uncertainty: dict[str, dict[str, Any]], regions: tuple[str, ...]) -> str:
    """The over-cases statistics of `uncertainty_summary` as a Markdown table."""
    lines = [
        "| region | UEO at the best mean threshold | threshold | "
        "Spearman ρ (mean uncertainty, Dice) | cases |",
        "|---|---|---|---|---|",
    ]
    for region in regions:
        u = uncertainty[region]
        lines.append(
            f"| {region.upper()} | {u['ueo']:.3g} | {u['ueo_threshold']:g} | "
            f"{u['spearman_uncertainty_dice']:.3g} | {u['n']} |"
        )
    return "\n".join(lines)


def write_cases_csv(
    path: Path,
    scores: list[CaseScores],
    regions: tuple[str, ...],
    metrics: tuple[str, ...] = METRICS,
) -> None:
    """One row per case: `case_id`, then `<region>_<metric>` for each metric."""
    columns = [f"{r}_{m}" for r in regions for m in metrics]
    _write_case_rows(
        path, scores, columns, lambda s: [s.values[r][m] for r in regions for m in metrics]
    )


def _write_case_rows(
    path: Path, scores: list[CaseScores], columns: list[str], values: Callable[[CaseScores], list]
) -> None:
    """A CSV of `case_id` and `columns`: per case, its id and `values(case)`, each to 6
    significant digits."""
    rows = [[s.case_id] + [f"{v:.6g}" for v in values(s)] for s in scores]
    write_csv_atomic(path, ["case_id", *columns], rows)


def markdown_table(summary: dict[str, Any], regions: tuple[str, ...]) -> str:
    """Mean ± std per region; Dice and IoU in % as in the paper.

    When the summary holds them, the error-detection AUROC, UEO and mean uncertainty follow,
    then the lesion-wise BraTS metrics: their Dice (%), HD95, NSD and panoptic quality (%).
    """
    shown = ("dice", "iou", "hd95", "ece", "ece_uncalibrated", "brier", "nll", "qubrats_score")
    against_errors = ("error_auroc", "ueo", "mean_uncertainty")
    if all(m in summary[r] for r in regions for m in against_errors):
        shown += against_errors
    lesion_wise = ("lesion_dice", "lesion_hd95", "lesion_nsd", "lesion_pq")
    if all(m in summary[r] for r in regions for m in lesion_wise):
        shown += lesion_wise
    percent = {"dice", "iou", "lesion_dice", "lesion_pq"}
    header = "| region | " + " | ".join(shown) + " |"
    lines = [header, "|" + "---|" * (len(shown) + 1)]
    for region in regions:
        cells = []
        for metric in shown:
            scale = 100.0 if metric in percent else 1.0
            stats = summary[region][metric]
            cells.append(f"{scale * stats['mean']:.3g} ± {scale * stats['std']:.2g}")
        lines.append(f"| {region.upper()} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate_folder(
    run: PredictionRun,
    out_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    progress: bool = True,
    brats_metrics: bool = False,
) -> dict[str, Any]:
    """Scores every case of a prediction folder and writes the evaluation files.

    Writes to `out_dir` (created): `cases.csv` (one row per case, `<region>_<metric>`
    columns), `ueo_curves.csv` (each case's UEO curve, `write_ueo_curves_csv`),
    `summary.json` (`summarize`), `uncertainty.json` (`uncertainty_summary`: UEO at the best
    mean threshold, Spearman ρ of mean uncertainty against Dice), `summary.md`
    (`markdown_table` and `uncertainty_markdown`), `reliability.png` (pooled bins before and
    after the temperature) and `qubrats_curves.png` (mean QU-BraTS filtering curves). With
    `brats_metrics`, the
    `BRATS_METRICS` columns and means too, and `brats_metrics.yaml`: the configuration the
    official package ran with.

    Args:
      run: the prediction folder (`PredictionRun.read`).
      out_dir: the output folder.
      data_dir: the dataset holding the ground truth; None: the input `run` recorded.
      progress: show a progress bar over the cases.
      brats_metrics: also the lesion-wise BraTS metrics of the official package
        (`vi_seg_jax.brats_metrics`; needs `pip install -e ".[brats]"`).

    Returns:
      The summary written to `summary.json`: region -> metric -> mean, std, n.

    Raises:
      DataError: a predicted case without ground truth in `data_dir`, or no cases.
      brats_metrics.MissingBratsMetrics: `brats_metrics` without the package (checked
        before any case is scored).
    """
    from vi_seg_jax.plots import qubrats_figure, reliability_figure

    data_dir = data_dir or run.input
    out_dir = Path(out_dir)
    dataset = discover_cases(data_dir, require_labels=True)
    by_id = {case.case_id: case for case in dataset.cases}
    missing = [c for c in run.case_ids if c not in by_id]
    if missing:
        raise DataError(data_dir, f"has no ground truth for predicted case(s) {missing}")
    if not run.case_ids:
        raise DataError(run.folder, "holds no predicted cases")
    # One layout per dataset, so one configuration of the official package.
    brats = scorer_for(dataset.layout.convention, run.regions) if brats_metrics else None
    metrics = METRICS + BRATS_METRICS if brats_metrics else METRICS
    scores = [
        evaluate_case(run, by_id[case_id], brats=brats)
        for case_id in tqdm(
            run.case_ids, desc="evaluating", unit="case", disable=None if progress else True
        )
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    regions = run.regions
    if brats is not None:
        brats.save_config(out_dir / "brats_metrics.yaml")
    write_cases_csv(out_dir / "cases.csv", scores, regions, metrics)
    write_ueo_curves_csv(out_dir / "ueo_curves.csv", scores, regions)
    summary = summarize(scores, regions, metrics)
    write_json_atomic(out_dir / "summary.json", summary)
    uncertainty = uncertainty_summary(scores, regions)
    write_json_atomic(out_dir / "uncertainty.json", uncertainty)
    tables = markdown_table(summary, regions) + "\n\n" + uncertainty_markdown(uncertainty, regions)
    write_text_atomic(out_dir / "summary.md", tables + "\n")
    reliability_figure(
        out_dir / "reliability.png",
        {
            f"{region} {when}": pool_bins([s.bins[region][when] for s in scores])
            for region in regions
            for when in ("before", "after")
        },
        title=f"{len(scores)} case(s), inside the brain mask",
    )
    qubrats_figure(
        out_dir / "qubrats_curves.png",
        {region: mean_curves([s.curves[region] for s in scores]) for region in regions},
        title=f"QU-BraTS filtering curves, mean of {len(scores)} case(s)",
    )
    return summary
