"""What the multi-run studies (`reproduce`, `transfer`) share: run-or-reuse, test scores, tables."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np


def train_or_reuse(config, workdir: Path) -> Path:
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


def predictor_for(workdir: Path, samples: int):
    from vi_seg_jax.predict import Predictor, load_trained

    model = load_trained(workdir)
    return Predictor(model, num_samples=model.spec.strategy.default_samples(samples))


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
    row_order: Sequence[str] | None = None,
    reference: Callable[[object, object], float | None] | None = None,
) -> str:
    """Markdown table of `metric` mean ± std (n runs) per (row, column) cell.

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
            cell = f"{np.mean(values):.1f} ± {np.std(values):.1f} ({len(values)})" if values else ""
            paper = reference(name, column) if reference else None
            cells.append(cell + (f" (paper {paper:.1f})" if paper is not None else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
