"""Figures a person would rather look at than read (matplotlib, written to PNG)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from vi_seg_jax.metrics import CalibrationBins, QUBraTS, bins_ece


def tumour_slice(mask: np.ndarray) -> int:
    """Axial index with the most foreground (the middle slice when there is none)."""
    areas = np.asarray(mask).reshape(-1, mask.shape[-1]).sum(axis=0)
    return int(np.argmax(areas)) if areas.any() else mask.shape[-1] // 2


@dataclasses.dataclass(frozen=True)
class CaseVolumes:
    """One case's volumes as the figures show them, each [X, Y, Z]."""

    image: np.ndarray  # one modality
    truth: np.ndarray | None  # bool whole-tumour mask, or None when the case has no label
    prediction: np.ndarray  # bool whole-tumour mask
    aleatoric: np.ndarray  # foreground variance
    epistemic: np.ndarray  # foreground variance


def uncertainty_figure(path: str | Path, volumes: CaseVolumes, *, title: str = "") -> Path:
    """The paper's figure layout: input, ground truth, prediction, aleatoric, epistemic.

    Args:
      path: PNG to write.
      volumes: the case's maps; the axial slice shown is `tumour_slice` of the truth (of
        the prediction when there is no truth).
      title: figure title.
    """
    z = tumour_slice(volumes.truth if volumes.truth is not None else volumes.prediction)
    panels = [
        ("input", volumes.image, "gray"),
        ("ground truth", volumes.truth, "gray"),
        ("prediction", volumes.prediction, "gray"),
        ("aleatoric", volumes.aleatoric, "magma"),
        ("epistemic", volumes.epistemic, "magma"),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for axis, (name, volume, cmap) in zip(axes, panels, strict=True):
        axis.set_axis_off()
        axis.set_title(name)
        if volume is None:
            axis.text(0.5, 0.5, "not available", ha="center", va="center", transform=axis.transAxes)
            continue
        shown = axis.imshow(np.rot90(np.asarray(volume, np.float32)[:, :, z]), cmap=cmap)
        if cmap == "magma":
            figure.colorbar(shown, ax=axis, fraction=0.046, pad=0.04)
    figure.suptitle(f"{title} (axial slice {z})" if title else f"axial slice {z}")
    figure.tight_layout()
    return _save(figure, path)


def _save(figure: plt.Figure, path: str | Path) -> Path:
    """Writes a figure to a PNG, creating the folder, and closes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _check_bins(name: str, bins: CalibrationBins) -> None:
    """Rejects bins whose arrays do not describe the same B bins."""
    num_bins = len(bins.counts)
    if len(bins.edges) != num_bins + 1 or not (
        len(bins.confidence) == len(bins.accuracy) == num_bins
    ):
        raise ValueError(f"bins {name!r}: edges, counts, confidence and accuracy disagree on B")


def reliability_figure(
    path: str | Path, bins_by_name: dict[str, CalibrationBins], title: str = ""
) -> Path:
    """Reliability diagram: accuracy against mean confidence per bin, one line per entry.

    The diagonal is perfect calibration; each legend entry carries its ECE. Below, the voxel
    count per bin (log scale, since brain voxels pile up near p = 0).

    Args:
      path: PNG to write.
      bins_by_name: e.g. {"wt before": ..., "wt after": ...} from ``calibration_bins``.
      title: figure title.
    """
    if not bins_by_name:
        raise ValueError("bins_by_name is empty")
    for name, bins in bins_by_name.items():
        _check_bins(name, bins)
    figure, (curve_axis, count_axis) = plt.subplots(
        2, 1, figsize=(5.0, 6.0), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    curve_axis.plot([0, 1], [0, 1], color="gray", linestyle="--", label="perfect")
    for name, bins in bins_by_name.items():
        nonempty = bins.counts > 0
        label = f"{name} (ECE {bins_ece(bins):.4f})"
        curve_axis.plot(bins.confidence[nonempty], bins.accuracy[nonempty], marker="o", label=label)
        # Empty bins are drawn at 1 so that the log axis has no zeros to hide.
        count_axis.stairs(np.maximum(bins.counts, 1), bins.edges, label=name)
    curve_axis.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy (fraction positive)")
    curve_axis.legend(loc="upper left", fontsize="small")
    count_axis.set_yscale("log")
    count_axis.set(xlabel="confidence (positive-class probability)", ylabel="voxels")
    figure.suptitle(title or "reliability")
    figure.tight_layout()
    return _save(figure, path)


def qubrats_figure(path: str | Path, curves_by_region: dict[str, QUBraTS], title: str = "") -> Path:
    """QU-BraTS filtering curves: Dice, FTP and FTN against the threshold τ, one line per region.

    Each legend entry carries the curve's AUC (over τ / 100); the title carries the scores.

    Args:
      path: PNG to write.
      curves_by_region: e.g. {"wt": ..., "tc": ..., "et": ...} from ``qubrats``.
      title: figure title.
    """
    if not curves_by_region:
        raise ValueError("curves_by_region is empty")
    for region, curves in curves_by_region.items():
        if not len(curves.thresholds) == len(curves.dice) == len(curves.ftp) == len(curves.ftn):
            raise ValueError(f"region {region!r}: thresholds and curves differ in length")
    panels = [("Dice", "dice", "dice_auc"), ("FTP", "ftp", "ftp_auc"), ("FTN", "ftn", "ftn_auc")]
    figure, axes = plt.subplots(1, len(panels), figsize=(13.0, 4.0))
    for axis, (label, curve_field, auc_field) in zip(axes, panels, strict=True):
        for region, curves in curves_by_region.items():
            auc = getattr(curves, auc_field)
            axis.plot(
                curves.thresholds, getattr(curves, curve_field), label=f"{region} (AUC {auc:.3f})"
            )
        # τ decreases from left to right, the order in which filtering removes voxels.
        axis.set(xlim=(100, 0), ylim=(-0.02, 1.02), xlabel="uncertainty threshold τ", title=label)
        axis.legend(fontsize="small")
    scores = ", ".join(f"{region} {c.score:.3f}" for region, c in curves_by_region.items())
    figure.suptitle(f"{title}: QU-BraTS score {scores}" if title else f"QU-BraTS score {scores}")
    figure.tight_layout()
    return _save(figure, path)


def tumour_centre(mask: np.ndarray) -> tuple[int, ...]:
    """Voxel at the foreground's centre of mass (the volume's centre when empty)."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        return tuple(s // 2 for s in mask.shape)
    return tuple(int(c) for c in np.rint(np.argwhere(mask).mean(axis=0)))


def _view(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """One slice in radiological display orientation (superior / anterior up)."""
    return np.rot90(np.take(np.asarray(volume, np.float32), index, axis=axis))


def overview_figure(path: str | Path, volumes: CaseVolumes, *, title: str = "") -> Path:
    """Axial, coronal and sagittal slices through the tumour: one row per view.

    Columns: input, ground truth (when given), prediction, aleatoric and epistemic maps
    (shared colour scale per map across the views).

    Args:
      path: PNG to write.
      volumes: the case's maps, which must share one 3D shape.
      title: figure title.
    """
    image, truth, prediction = volumes.image, volumes.truth, volumes.prediction
    aleatoric, epistemic = volumes.aleatoric, volumes.epistemic
    shapes = {np.shape(a) for a in (image, prediction, aleatoric, epistemic)}
    if truth is not None:
        shapes.add(np.shape(truth))
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(f"overview maps must share one 3D shape, got {sorted(shapes)}")
    centre = tumour_centre(truth if truth is not None and np.any(truth) else prediction)
    columns = [("input", image, "gray", None)]
    if truth is not None:
        columns.append(("ground truth", truth, "gray", (0, 1)))
    columns.append(("prediction", prediction, "gray", (0, 1)))
    for name, volume in (("aleatoric", aleatoric), ("epistemic", epistemic)):
        columns.append((name, volume, "magma", (0.0, max(float(np.max(volume)), 1e-6))))
    views = (("axial", 2), ("coronal", 1), ("sagittal", 0))
    figure, axes = plt.subplots(
        len(views),
        len(columns),
        figsize=(2.8 * len(columns), 2.8 * len(views)),
        squeeze=False,
        layout="constrained",
    )
    for row, (view, axis_index) in enumerate(views):
        for col, (name, volume, cmap, limits) in enumerate(columns):
            axis = axes[row, col]
            axis.set_axis_off()
            vmin, vmax = limits if limits else (None, None)
            shown = axis.imshow(
                _view(volume, axis_index, centre[axis_index]), cmap=cmap, vmin=vmin, vmax=vmax
            )
            if row == 0:
                axis.set_title(name)
            if col == 0:
                axis.text(-0.08, 0.5, view, rotation=90, va="center", transform=axis.transAxes)
            if cmap == "magma" and row == len(views) - 1:
                figure.colorbar(shown, ax=axes[:, col].tolist(), shrink=0.6)
    figure.suptitle(f"{title} (through voxel {centre})" if title else f"through voxel {centre}")
    return _save(figure, path)


def transfer_figure(path: str | Path, rows: list[dict], metric: str = "dice") -> Path:
    """Mean ± std of `metric` (%) against the number of training cases, one line per variant.

    Args:
      path: PNG to write.
      rows: one dict per run with `variant`, `train_size` and `metric`.
      metric: the key to plot.
    """
    if not rows:
        raise ValueError("no runs to plot")
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        sizes = sorted({r["train_size"] for r in rows if r["variant"] == variant})
        values = [
            [100 * r[metric] for r in rows if r["variant"] == variant and r["train_size"] == s]
            for s in sizes
        ]
        mean = np.array([np.mean(v) for v in values])
        std = np.array([np.std(v) for v in values])
        axis.errorbar(sizes, mean, yerr=std, marker="o", capsize=3, label=variant)
    axis.set_xlabel("training cases")
    axis.set_ylabel(f"test {metric} (%)")
    axis.grid(alpha=0.3)
    axis.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the lines, never on them
    figure.tight_layout()
    return _save(figure, path)


def methods_figure(path: str | Path, rows: list[dict]) -> Path:
    """Per method: Dice, ECE and QU-BraTS score side by side (one panel each).

    Args:
      path: PNG to write.
      rows: one dict per method with `method`, `dice`, `ece` and `qubrats_score`.
    """
    if not rows:
        raise ValueError("no methods to plot")
    panels = (("dice", "Dice (higher is better)"), ("ece", "ECE (lower is better)"))
    panels += (("qubrats_score", "QU-BraTS score (higher is better)"),)
    names = [r["method"] for r in rows]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for axis, (key, title) in zip(axes, panels, strict=True):
        axis.bar(names, [r[key] for r in rows], color="tab:blue")
        axis.set_title(title)
        axis.tick_params(axis="x", rotation=30)
        axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


# (key, axis label, scale) of the shift study's panels: Dice in %, u = entropy in bits × 100
# (the `_unc` maps' 0-100 scale).
SHIFT_PANELS = (
    ("dice", "test Dice (%)", 100.0),
    ("mean_uncertainty", "mean uncertainty in the brain (0-100)", 100.0),
)


def shift_figure(
    path: str | Path,
    rows: list[dict],
    *,
    panels: tuple[tuple[str, str, float], ...] = SHIFT_PANELS,
    title: str = "",
) -> Path:
    """Metrics against the shift level, one line per method, one panel per metric.

    Each point is the mean over the repeats of a method at a level, its error bar their
    standard deviation (population, as the tables').

    Args:
      path: PNG to write.
      rows: one dict per method × level × repeat with `method`, `level` and each panel's key.
      panels: (key, axis label, scale) per panel; the values are multiplied by scale.
      title: figure title (e.g. the kind of shift).
    """
    if not rows:
        raise ValueError("no rows to plot")
    if not panels:
        raise ValueError("no panels to plot")
    missing = sorted({key for key, _, _ in panels if any(key not in r for r in rows)})
    if missing:
        raise ValueError(f"rows lack the panel key(s) {missing}")
    levels = sorted({int(r["level"]) for r in rows})
    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels) + 1.6, 3.8))
    axes = np.atleast_1d(axes)
    for axis, (key, label, scale) in zip(axes, panels, strict=True):
        for method in dict.fromkeys(r["method"] for r in rows):
            by_level: dict[int, list[float]] = {}
            for r in rows:
                if r["method"] == method:
                    by_level.setdefault(int(r["level"]), []).append(scale * float(r[key]))
            at = sorted(by_level)
            values = [by_level[level] for level in at]
            axis.errorbar(
                at,
                [np.mean(v) for v in values],
                yerr=[np.std(v) for v in values],
                marker="o",
                capsize=3,
                label=method,
            )
        axis.set_xticks(levels)
        axis.set(xlabel="shift level (0 = none)", ylabel=label)
        axis.grid(alpha=0.3)
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the lines
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return _save(figure, path)
