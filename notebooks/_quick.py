"""Shared set-up of the notebooks: where the data and the trained runs come from.

Quick mode builds everything from scratch in a temporary folder: a handful of small synthetic
cases and a tiny Bayesian U-Net trained for a few dozen steps, so that a notebook runs top to
bottom in about a minute on a laptop CPU. Its numbers and pictures show what each step does,
not the paper's results.

Full mode uses the embedded default dataset and the quick-start run of the README
(`python -m experiments.train --backbone unet`, written to `runs/unet-vi-quick-seed0`), and
trains that run first when it is missing (about 4 minutes on a 2-core CPU).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

with warnings.catch_warnings():
    # Progress bars stay off in the notebooks, so the widget-based ones are not needed.
    warnings.filterwarnings("ignore", message="IProgress not found")
    import tqdm.auto  # noqa: F401

from experiments.configs import get_config, with_overrides
from vi_seg_jax.data.synthetic import write_dataset
from vi_seg_jax.train.config import EMBEDDED_SPLIT_SIZES, TrainConfig
from vi_seg_jax.train.loop import train_and_evaluate

REPO = Path(__file__).resolve().parent.parent
QUICK_START_RUN = REPO / "runs" / "unet-vi-quick-seed0"
# Training cases of the quick-start run (the embedded dataset's protocol).
DEFAULT_TRAIN_SIZE = EMBEDDED_SPLIT_SIZES[2]

# Small cases on a coarse grid (7.5 × 7.5 × 6.5 mm voxels): generated in a fraction of a second.
TINY_SHAPE = (32, 32, 24)
# Posterior samples per case and sliding-window size for the tiny runs.
TINY_SAMPLES = 4
TINY_WINDOW = 32


def work_folder(quick: bool) -> Path:
    """Where a notebook writes: a fresh temporary folder (quick) or `runs/notebooks/` (full)."""
    if quick:
        return Path(tempfile.mkdtemp(prefix="vi_seg_jax-notebook-"))
    folder = REPO / "runs" / "notebooks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def tiny_dataset(
    folder: str | Path, *, num_cases: int = 5, domain: str = "tumour", seed: int = 0
) -> Path:
    """Writes `num_cases` small synthetic cases (BraTS 2021 layout) unless already there."""
    folder = Path(folder)
    if not folder.is_dir():
        write_dataset(folder, num_cases=num_cases, domain=domain, shape=TINY_SHAPE, seed=seed)
    return folder


def tiny_config(
    data_dir: str | Path,
    *,
    train_size: int = 2,
    test_size: int = 2,
    validation_size: int = 1,
    seed: int = 0,
) -> TrainConfig:
    """A tiny 3D U-Net and a short schedule on `data_dir`: compilation, not training, takes
    most of the time."""
    return with_overrides(
        get_config("unet", "quick"),
        backbone={"features": (4, 8, 8, 16)},
        data={
            "data_dir": str(Path(data_dir).absolute()),
            "train_size": train_size,
            "test_size": test_size,
            "validation_size": validation_size,
            "patch_shape": (16, 16, 16),
            "batch_size": 2,
        },
        schedule={"steps_per_epoch": 10, "steps": 20, "validation_samples": 2},
        seed=seed,
    )


def train_tiny(config: TrainConfig, workdir: str | Path) -> Path:
    """Trains `config` (`tiny_config`) into `workdir`, unless already there."""
    workdir = Path(workdir)
    if not (workdir / "summary.json").is_file():
        train_and_evaluate(config, workdir, progress=False, tensorboard=False)
    return workdir


def make_tiny_run(folder: str | Path) -> Path:
    """Tiny data (5 cases: 2 train, 1 validation, 2 test) and a tiny run trained on it."""
    folder = Path(folder)
    data = tiny_dataset(folder / "data")
    return train_tiny(tiny_config(data), folder / "run")


def _train_quick_preset(workdir: Path, train_size: int | None = None) -> Path:
    """`python -m experiments.train --backbone unet [--train-size N]` into `workdir`, unless
    already finished."""
    if not (workdir / "summary.json").is_file():
        config = get_config("unet", "quick")
        if train_size:
            config = with_overrides(config, data={"train_size": train_size})
        # An interrupted run continues from its last checkpoint.
        train_and_evaluate(config, workdir, resume=(workdir / "checkpoints").is_dir())
    return workdir


def quick_start_run() -> Path:
    """The README's quick-start run on the default dataset, trained first when missing."""
    return _train_quick_preset(QUICK_START_RUN)


def train_size_run(quick: bool, folder: str | Path, train_size: int) -> Path:
    """A run trained on `train_size` cases; every size shares the same test and validation cases.

    Quick: a tiny run on the tiny dataset of `folder`. Full: the quick preset on the default
    dataset (its 20-case run is the quick-start run).
    """
    folder = Path(folder)
    if quick:
        data = tiny_dataset(folder / "data")
        config = tiny_config(data, train_size=train_size)
        return train_tiny(config, folder / f"train-size-{train_size}")
    if train_size == DEFAULT_TRAIN_SIZE:
        return quick_start_run()
    workdir = folder / f"unet-vi-quick-train{train_size}-seed0"
    return _train_quick_preset(workdir, train_size)


def get_run(quick: bool, folder: str | Path) -> Path:
    """The run a notebook studies: a tiny one in `folder` (quick) or the quick-start run."""
    return make_tiny_run(folder) if quick else quick_start_run()


def summary(workdir: str | Path) -> dict:
    """A run's `summary.json` (best and final validation Dice / IoU, steps, wall time)."""
    return json.loads((Path(workdir) / "summary.json").read_text())
