"""A training run's folder, read back: configuration, checkpoints, splits and temperatures.

`read_run(workdir)` restores the best checkpoint of a training workdir (by validation Dice;
the latest when none is marked best) with its configuration and, when they were fitted for
that checkpoint, the per-region temperatures (`calibration.json`). Training writes these
files (`train.loop`); `model_archive` packs the same model into one file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp

from vi_seg_jax.calibration import CALIBRATION_FILE, region_names
from vi_seg_jax.checkpoint import checkpoint_manager, read_meta, restore_checkpoint
from vi_seg_jax.errors import DataError, first_line
from vi_seg_jax.train.build import build_spec
from vi_seg_jax.train.config import TrainConfig
from vi_seg_jax.train.state import ModelSpec, TrainState, create_train_state

DEFAULT_SAMPLES = 20  # Monte Carlo samples of a case, for the methods that sample


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A restored run: configuration, model, state at `step`, temperatures (region → T).

    `calibrated_with`: the `Predictor.settings()` the temperatures were fitted with.
    """

    workdir: Path
    config: TrainConfig
    spec: ModelSpec
    state: TrainState
    step: int
    temperatures: dict[str, float]
    calibrated_with: dict = dataclasses.field(default_factory=dict)

    @property
    def task(self) -> str:
        return self.config.likelihood.task

    @property
    def regions(self) -> tuple[str, ...]:
        return region_names(self.task)

    def default_samples(self) -> int:
        return self.spec.strategy.default_samples(DEFAULT_SAMPLES)


def _best_step(workdir: Path, steps: list[int]) -> int:
    summary = workdir / "summary.json"
    if summary.exists():
        best = json.loads(summary.read_text()).get("best_step")
        if best in steps:
            return best
    return max(steps)


def read_run(workdir: str | Path, step: int | None = None) -> TrainedModel:
    """Restores a training workdir's best (or given) checkpoint.

    Raises:
      DataError: not a training workdir, no checkpoint, or a checkpoint that does not
        match the workdir's configuration (another backbone or size).
    """
    workdir = Path(workdir)
    config_path = workdir / "config.json"
    checkpoints = workdir / "checkpoints"
    if not config_path.is_file():
        raise DataError(workdir, "not a training workdir (no config.json)")
    if not checkpoints.is_dir():
        raise DataError(workdir, "holds no checkpoints/ folder")
    try:
        config = TrainConfig.from_dict(json.loads(config_path.read_text()))
    except (ValueError, TypeError, KeyError) as error:
        raise DataError(config_path, f"not a valid training configuration ({error})") from None
    manager = checkpoint_manager(checkpoints)
    steps = list(manager.all_steps())
    if not steps:
        raise DataError(checkpoints, "no checkpoint found")
    if step is None:
        step = _best_step(workdir, steps)
    elif step not in steps:
        raise DataError(checkpoints, f"no checkpoint at step {step}; available: {sorted(steps)}")
    saved = TrainConfig.from_dict(read_meta(manager, step)["config"]).backbone
    if saved != config.backbone:
        raise DataError(
            checkpoints / str(step),
            f"was written for backbone {saved}, config.json has {config.backbone}",
        )
    spec = build_spec(config, num_data=1.0, with_prior=False)
    patch = tuple(config.data.patch_shape)
    dummy = jax.ShapeDtypeStruct((1, *patch, len(config.data.modalities)), jnp.float32)
    like = jax.eval_shape(lambda x: create_train_state(jax.random.key(0), spec, x), dummy)
    try:
        state, _ = restore_checkpoint(manager, like, step)
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(
            checkpoints / str(step),
            f"does not match the {config.backbone.name} model of config.json ({first_line(error)})",
        ) from None
    return TrainedModel(workdir, config, spec, state, step, *_calibration(workdir, step))


def read_splits(workdir: str | Path) -> dict:
    """A training workdir's `splits.json` (dataset root and the case ids of each split)."""
    path = Path(workdir) / "splits.json"
    if not path.is_file():
        raise DataError(Path(workdir), "holds no splits.json")
    return json.loads(path.read_text())


def _calibration(workdir: Path, step: int) -> tuple[dict[str, float], dict]:
    """Temperatures fitted for checkpoint `step` and the predictor settings used, if any."""
    path = workdir / CALIBRATION_FILE
    if not path.exists():
        return {}, {}
    calibration = json.loads(path.read_text())
    if calibration.get("step") != step:
        return {}, {}
    return calibration["temperature"], calibration.get("predictor", {})
