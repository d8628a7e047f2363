"""What the multi-run studies (`reproduce`, `transfer`, `shift_study`) share: the grid of
runs (train or reuse each, score it on the held-out test cases), the predictors, and the
tables."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from vi_seg_jax.train.config import TrainConfig


def run_grid(
    names: Sequence[str],
    sizes: Sequence[int],
    repeats: int,
    *,
    name_key: str,
    config_for: Callable[[str, int, int], TrainConfig],
    runs_dir: Path,
    samples: int,
    after_each: Callable[[list[dict]], None],
    desc: str = "runs",
    progress: bool = True,
) -> list[dict]:
    """Trains (or reuses) a run per repeat × train size × name and scores its test cases.

    Runs go, in that order (every name of a size, every size of a repeat), to
    `runs_dir/<name>-n<size>-r<repeat>`, trained from `config_for(name, size, repeat)`.

    Args:
      names: what differs between the runs of one size (backbones, variants).
      sizes: training set sizes.
      repeats: seeded draws of the training cases per size (0 .. repeats - 1).
      name_key: the rows' column holding the name.
      config_for: the configuration of one run.
      runs_dir: where the runs' workdirs are.
      samples: Monte Carlo samples at test time (`held_out_dice_iou`).
      after_each: called with the rows so far after each run (tables kept up to date).
      desc: the progress bar's label.
      progress: show a progress bar over the runs.

    Returns:
      One row per run: `{name_key: name, "train_size", "repeat", "dice", "iou"}`.
    """
    from tqdm.auto import tqdm

    runs = [(name, size, repeat) for repeat in range(repeats) for size in sizes for name in names]
    rows = []
    for name, size, repeat in tqdm(runs, desc=desc, disable=None if progress else True):
        workdir = runs_dir / f"{name}-n{size}-r{repeat}"
        train_or_reuse(config_for(name, size, repeat), workdir)
        scores = held_out_dice_iou(workdir, samples)
        rows.append({name_key: name, "train_size": size, "repeat": repeat, **scores})
        after_each(rows)
    return rows


def train_or_reuse(config: TrainConfig, workdir: Path) -> Path:
    """Trains `config` into `workdir` unless a finished run is there (resumes a killed one)."""
    from vi_seg_jax.train.loop import train_and_evaluate

    if not (workdir / "summary.json").exists():
        resume = (workdir / "checkpoints").is_dir()
        train_and_evaluate(config, workdir, resume=resume, progress=False, tensorboard=False)
    return workdir


def held_out_cases(workdir: Path):
    """The run's fixed held-out test cases (from its splits.json)."""
    from vi_seg_jax.data.discovery import discover_cases
    from vi_seg_jax.predict import read_splits

    splits = read_splits(workdir)
    wanted = set(splits["test"])
    return [c for c in discover_cases(splits["root"]).cases if c.case_id in wanted]


def predictor_for(workdir: Path, samples: int, *, tta: str = "none", mesh=None):
    """The run's predictor: `samples` Monte Carlo samples, or what its method fixes (1 for
    the deterministic network, one per ensemble member); `tta` and `mesh` as `Predictor`'s."""
    from vi_seg_jax.predict import Predictor, load_trained

    model = load_trained(workdir)
    samples = model.spec.strategy.default_samples(samples)
    return Predictor(model, num_samples=samples, tta=tta, mesh=mesh)


def held_out_dice_iou(workdir: Path, samples: int) -> dict[str, float]:
    """Mean whole-tumour Dice and IoU over the run's test cases (the paper's metrics)."""
    from vi_seg_jax.metrics import dice, iou

    predictor = predictor_for(workdir, samples)
    dices, ious = [], []
    for case in held_out_cases(workdir):
        out = predictor.predict_case(case, progress=False)
        predicted, truth = out.labels > 0, out.truth > 0
        dices.append(dice(predicted, truth))
        ious.append(iou(predicted, truth))
    return {"dice": float(np.mean(dices)), "iou": float(np.mean(ious))}


def write_csv(path: Path, rows: list[dict]) -> None:
    from vi_seg_jax.io.folders import write_csv_atomic

    write_csv_atomic(path, list(rows[0]), [list(row.values()) for row in rows])


def mean_std_table(
    rows: list[dict],
    *,
    row_key: str,
    column_key: str,
    metric: str,
    scale: float = 100.0,
    decimals: int = 1,
    row_order: Sequence[str] | None = None,
    reference: Callable[[object, object], float | None] | None = None,
) -> str:
    """Markdown table of `metric` mean ± std (n runs) per (row, column) cell.

    Values are multiplied by `scale` and shown with `decimals` decimals.
    `reference(row, column)`, when given, adds a "(paper X)" note to each cell.
    """
    rows_seen = list(dict.fromkeys(r[row_key] for r in rows))
    order = [r for r in (row_order or rows_seen) if r in rows_seen]
    columns = sorted({r[column_key] for r in rows})
    lines = [f"| {row_key} | " + " | ".join(f"{column_key} {c}" for c in columns) + " |"]
    lines.append("|---|" + "---|" * len(columns))
    for name in order:
        cells = []
        for column in columns:
            values = [
                scale * r[metric] for r in rows if r[row_key] == name and r[column_key] == column
            ]
            cell = ""
            if values:
                mean, std = np.mean(values), np.std(values)
                cell = f"{mean:.{decimals}f} ± {std:.{decimals}f} ({len(values)})"
            paper = reference(name, column) if reference else None
            cells.append(cell + (f" (paper {paper:.1f})" if paper is not None else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
