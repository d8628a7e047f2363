"""Typed configuration of a training run (presets live in `experiments/configs.py`)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

from vi_seg_jax.bayes.elbo import LikelihoodConfig
from vi_seg_jax.bayes.guide import GuideConfig
from vi_seg_jax.data.conventions import MODALITIES
from vi_seg_jax.methods import MethodConfig, resolve_method
from vi_seg_jax.ops.conv3d import ConvEngine
from vi_seg_jax.train.state import OptimConfig


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    """Which backbone and its hyperparameters (None: the class default).

    `conv_impl` is how its 3D convolutions are computed (`vi_seg_jax.ops.CONV_IMPLS`):
    "auto" uses the formulations measured fastest on the machine; any other value forces one
    (for comparisons and tests); the results agree to float rounding.
    """

    name: str = "unet"
    spatial_dims: int = 3
    features: tuple[int, ...] | None = None
    short: bool = False
    dropout_rate: float = 0.0
    conv_impl: str = "auto"

    def kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "spatial_dims": self.spatial_dims,
            "dropout_rate": self.dropout_rate,
            "conv": ConvEngine(self.conv_impl),
        }
        if self.features is not None:
            kwargs["features"] = tuple(self.features)
        if self.name == "unet":
            kwargs["short"] = self.short
        return kwargs


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where cases come from and how training batches are drawn.

    Attributes:
      data_dir: a BraTS-layout folder; None for the embedded synthetic dataset.
      modalities: input channels, in order.
      normalization: `zscore` or `minmax` inside the brain mask.
      test_size / validation_size: fixed, seeded held-out sets (never trained on).
      train_size: training cases drawn from the rest (None: all of the rest).
      train_repeat: which independent draw of the training cases (repeats of the
        train-size protocol; the test and validation sets stay fixed).
      split_seed: seed of the splits (independent of the training seed).
      patch_shape: training patch, 3 ints (3D) or 2 (2D axial slices).
      batch_size: patches per step.
      foreground_fraction: share of patches forced to contain tumour.
      unbiased_weights: weight each voxel's data term by how likely the sampler is to
        draw it, so that the minibatch term estimates the full-data term without bias
        (`data.sampler`); False keeps the oversampled, tempered objective.
    """

    data_dir: str | None = None
    modalities: tuple[str, ...] = MODALITIES
    normalization: Literal["zscore", "minmax"] = "zscore"
    test_size: int = 10
    validation_size: int = 5
    train_size: int | None = 20
    train_repeat: int = 0
    split_seed: int = 0
    patch_shape: tuple[int, ...] = (32, 32, 32)
    batch_size: int = 2
    foreground_fraction: float = 0.5
    unbiased_weights: bool = False


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """How long to train and when to validate and save.

    Attributes:
      steps: optimisation steps in all.
      steps_per_epoch: steps counted as one epoch (learning-rate decay and early-stopping
        patience are in epochs, as in the paper code).
      decay_every_epochs: halve the learning rate every this many epochs (paper: 50).
      validate_every_epochs: validation period.
      validation_samples: Monte Carlo samples per validation volume.
      patience_epochs: stop when validation Dice has not improved for this long (paper:
        15); None disables early stopping.
      keep_checkpoints: how many of the latest checkpoints to keep (plus the best).
    """

    steps: int = 600
    steps_per_epoch: int = 50
    decay_every_epochs: int = 50
    validate_every_epochs: int = 2
    validation_samples: int = 4
    patience_epochs: int | None = 15
    keep_checkpoints: int = 3


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run."""

    backbone: BackboneConfig = BackboneConfig()
    method: MethodConfig = MethodConfig()
    prior: Literal["normal", "dwp"] = "normal"
    prior_dir: str | None = None  # the deep weight prior's folder (`prior="dwp"`)
    dwp_init: bool = False  # posterior means start from the prior's VAE samples
    dwp_train_encoder: bool = False  # the prior's encoders are trained with q (Algorithm 1)
    init_from: str | None = None  # a trained deterministic run whose weights start this one
    frozen_layers: tuple[str, ...] = ()  # top-level layers never updated (fine-tuning)
    likelihood: LikelihoodConfig = LikelihoodConfig()
    kl_weight: float = 1.0
    kl_warmup_epochs: int = 0
    learning_rate: float = 1e-3
    clip_norm: float | None = None
    data: DataConfig = DataConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: bfloat16 compute, float32 weights
    devices: int | None = None  # data-parallel devices; None: all that divide the batch
    preset: str = "custom"

    def __post_init__(self):
        resolve_method(self.method).check(self.backbone.dropout_rate)

    def optim(self) -> OptimConfig:
        return OptimConfig(
            learning_rate=self.learning_rate,
            decay_every_steps=self.schedule.decay_every_epochs * self.schedule.steps_per_epoch,
            clip_norm=self.clip_norm,
            frozen=tuple(self.frozen_layers),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        def build(kind, values):
            fields = {f.name: f for f in dataclasses.fields(kind)}
            kwargs = {}
            for name, value in values.items():
                if name not in fields:
                    raise ValueError(f"unknown config field {kind.__name__}.{name}")
                sub = _dataclass_type(kind, name)
                if sub is not None:
                    kwargs[name] = build(sub, value)
                elif isinstance(value, list):
                    kwargs[name] = tuple(value)
                else:
                    kwargs[name] = value
            return kind(**kwargs)

        return build(cls, data)


_NESTED = {
    (TrainConfig, "backbone"): BackboneConfig,
    (TrainConfig, "method"): MethodConfig,
    (TrainConfig, "likelihood"): LikelihoodConfig,
    (TrainConfig, "data"): DataConfig,
    (TrainConfig, "schedule"): ScheduleConfig,
    (MethodConfig, "guide"): GuideConfig,
}


def _dataclass_type(kind, name):
    return _NESTED.get((kind, name))
