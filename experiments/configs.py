"""Presets of `python -m experiments.train`.

`quick` (the default) trains in minutes on a 2-core CPU on the embedded synthetic data:

    python -m experiments.train --backbone unet
    # about 4 minutes on 2 CPU cores; validation Dice (whole tumour) 0.826, IoU 0.707

`paper` is the paper code's configuration, meant for a GPU: the full-size 3D U-Net
(16/32/64/128 channels), N(0, 1) prior, 0.01·CE (summed over voxels) + 0.99·Dice, Adam 1e-3
halved every 50 epochs, early stopping with patience 15 epochs, whole cropped volumes
(here: 128³ patches of them), log-variance initialised at −5, and the augmentation BraTS
teams train with (nnU-Net's; the paper code has none; `--augment none` turns it off):

    python -m experiments.train --backbone unet --preset paper --data-dir /data/BraTS2018
"""

from __future__ import annotations

import dataclasses

from vi_seg_jax.bayes.elbo import LikelihoodConfig
from vi_seg_jax.bayes.guide import GuideConfig
from vi_seg_jax.methods import MethodConfig
from vi_seg_jax.train.config import (
    BackboneConfig,
    DataConfig,
    OptimizerConfig,
    PriorConfig,
    ScheduleConfig,
    TrainConfig,
)

PRESETS = ("quick", "paper")

# Channels of the quick preset, per backbone: small enough for a CPU.
_QUICK_FEATURES = {"unet": (8, 16, 32, 64), "vnet": (8, 16, 32, 64), "fcn": (8, 16, 32, 64)}


def get_config(backbone: str = "unet", preset: str = "quick") -> TrainConfig:
    """The preset's configuration for `backbone` (`unet`, `vnet` or `fcn`)."""
    if preset == "quick":
        return _quick(backbone)
    if preset == "paper":
        return _paper(backbone)
    raise ValueError(f"unknown preset {preset!r}; expected one of {list(PRESETS)}")


def _quick(backbone: str) -> TrainConfig:
    """The paper's model and objective, shrunk to minutes on a CPU."""
    return with_overrides(
        _paper(backbone),
        backbone={"features": _QUICK_FEATURES.get(backbone)},
        prior={"kl_warmup_epochs": 4},
        optimizer={"learning_rate": 3e-3},
        data={
            "patch_shape": (32, 32, 32),
            "batch_size": 4,
            "foreground_fraction": 0.5,
            "augment": "none",
        },
        schedule={
            "steps": 200,
            "steps_per_epoch": 50,
            "decay_every_epochs": 4,
            "validate_every_epochs": 2,
            "validation_samples": 4,
            "patience_epochs": None,
        },
        preset="quick",
    )


def _paper(backbone: str) -> TrainConfig:
    """The paper code's configuration (the module docstring lists it)."""
    return TrainConfig(
        backbone=BackboneConfig(name=backbone, spatial_dims=3),
        method=MethodConfig(method="vi", estimator="lrt", guide=GuideConfig(init_log_var=-5.0)),
        likelihood=LikelihoodConfig(task="wt", ce_weight=0.01, dice_weight=0.99, reduction="sum"),
        prior=PriorConfig(kind="normal", kl_weight=1.0, kl_warmup_epochs=0),
        optimizer=OptimizerConfig(learning_rate=1e-3),
        data=DataConfig(
            patch_shape=(128, 128, 128), batch_size=1, foreground_fraction=0.33, augment="default"
        ),
        schedule=ScheduleConfig(
            steps=20_000,
            steps_per_epoch=100,
            decay_every_epochs=50,
            validate_every_epochs=1,
            validation_samples=10,
            patience_epochs=15,
        ),
        preset="paper",
    )


def with_overrides(config, **sections):
    """`config` with fields replaced, e.g. `with_overrides(c, data={"batch_size": 2}, seed=3)`;
    a dict replaces fields of a section (at any depth: `method={"guide": {...}}`)."""
    updates = {}
    for name, value in sections.items():
        current = getattr(config, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            updates[name] = with_overrides(current, **value) if value else current
        else:
            updates[name] = value
    return dataclasses.replace(config, **updates)
