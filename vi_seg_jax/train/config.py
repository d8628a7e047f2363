"""Typed configuration of a training run (presets live in `experiments/configs.py`)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

from vi_seg_jax.bayes.elbo import LikelihoodConfig
from vi_seg_jax.bayes.guide import GuideConfig
from vi_seg_jax.data.augment import AUGMENTATIONS
from vi_seg_jax.data.conventions import MODALITIES
from vi_seg_jax.methods import METHODS, MethodConfig, resolve_method
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


# Held-out shares of a user's dataset (at least one validation case; test may be 0).
TEST_FRACTION = 0.2
VALIDATION_FRACTION = 0.1
# The embedded synthetic dataset follows the paper's protocol on a CPU scale.
EMBEDDED_SPLIT_SIZES = (10, 5, 20)  # test, validation, training


class ConfigError(ValueError):
    """A config value that breaks a rule. Fields are named as `section.field` in backquotes,
    so that a command line can name its flag instead (`experiments.train`)."""


def _require(rules: dict[str, bool]) -> None:
    for message, holds in rules.items():
        if not holds:
            raise ConfigError(message)


@dataclasses.dataclass(frozen=True)
class SplitSizes:
    """Cases per split of one run."""

    test: int
    validation: int
    train: int


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where cases come from and how training batches are drawn.

    Attributes:
      data_dir: a BraTS-layout folder; None for the embedded synthetic dataset.
      modalities: input channels, in order.
      normalization: `zscore` or `minmax` inside the brain mask.
      test_size / validation_size: fixed, seeded held-out sets (never trained on); None:
        a share of the dataset (`TEST_FRACTION`, `VALIDATION_FRACTION`, at least one
        validation case), or the paper protocol's 10 and 5 on the embedded dataset.
      train_size: training cases drawn from the rest; None: all of the rest (20 on the
        embedded dataset, the paper protocol's largest set).
      train_repeat: which independent draw of the training cases (repeats of the
        train-size protocol; the test and validation sets stay fixed).
      split_seed: seed of the splits (independent of the training seed).
      patch_shape: training patch, 3 ints (3D) or 2 (2D axial slices).
      batch_size: patches per step.
      foreground_fraction: share of patches forced to contain tumour.
      unbiased_weights: weight each voxel's data term by how likely the sampler is to
        draw it, so that the minibatch term estimates the full-data term without bias
        (`data.sampler`); False keeps the oversampled, tempered objective.
      augment: the on-device augmentation of each training batch, a preset of
        `data.augment.AUGMENTATIONS` (`none`, `light`, `default`).
    """

    data_dir: str | None = None
    modalities: tuple[str, ...] = MODALITIES
    normalization: Literal["zscore", "minmax"] = "zscore"
    test_size: int | None = None
    validation_size: int | None = None
    train_size: int | None = None
    train_repeat: int = 0
    split_seed: int = 0
    patch_shape: tuple[int, ...] = (32, 32, 32)
    batch_size: int = 2
    foreground_fraction: float = 0.5
    unbiased_weights: bool = False
    augment: str = "none"

    def __post_init__(self):
        patch = tuple(self.patch_shape)
        _require(
            {
                f"`data.normalization` must be zscore or minmax, got {self.normalization!r}": (
                    self.normalization in ("zscore", "minmax")
                ),
                f"`data.test_size` must be >= 0, got {self.test_size}": (
                    self.test_size is None or self.test_size >= 0
                ),
                "`data.validation_size` must be >= 1 (validation picks the best checkpoint), "
                f"got {self.validation_size}": (
                    self.validation_size is None or self.validation_size >= 1
                ),
                f"`data.train_size` must be >= 1, got {self.train_size}": (
                    self.train_size is None or self.train_size >= 1
                ),
                f"`data.train_repeat` must be >= 0, got {self.train_repeat}": self.train_repeat
                >= 0,
                f"`data.patch_shape` needs 2 or 3 sizes >= 1, got {list(patch)}": (
                    len(patch) in (2, 3) and min(patch) >= 1
                ),
                f"`data.batch_size` must be >= 1, got {self.batch_size}": self.batch_size >= 1,
                f"`data.foreground_fraction` must be in [0, 1], got {self.foreground_fraction}": (
                    0.0 <= self.foreground_fraction <= 1.0
                ),
                f"`data.augment` must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}": (
                    self.augment in AUGMENTATIONS
                ),
            }
        )

    def split_sizes(self, num_cases: int) -> SplitSizes:
        """The sizes of each split for a dataset of `num_cases` (raises ConfigError when it
        cannot give them)."""
        if self.data_dir is None:
            test, validation, train = EMBEDDED_SPLIT_SIZES
            test = test if self.test_size is None else self.test_size
            validation = validation if self.validation_size is None else self.validation_size
            train = train if self.train_size is None else self.train_size
        else:
            # Leave at least one case for training and one for validation.
            test = self.test_size
            if test is None:
                test = min(max(1, round(TEST_FRACTION * num_cases)), max(num_cases - 2, 0))
            validation = self.validation_size or max(1, round(VALIDATION_FRACTION * num_cases))
            train = self.train_size or num_cases - test - validation
        if train < 1 or test + validation + train > num_cases:
            raise ConfigError(
                f"{num_cases} cases cannot give {test} test, {validation} validation and "
                f"{max(train, 0)} training cases; lower `data.test_size`, "
                "`data.validation_size` or `data.train_size`"
            )
        return SplitSizes(test, validation, train)


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

    def __post_init__(self):
        _require(
            {
                f"`schedule.steps` must give at least one step, got {self.steps}": self.steps >= 1,
                f"`schedule.steps_per_epoch` must be >= 1, got {self.steps_per_epoch}": (
                    self.steps_per_epoch >= 1
                ),
                f"`schedule.decay_every_epochs` must be >= 0, got {self.decay_every_epochs}": (
                    self.decay_every_epochs >= 0
                ),
                "`schedule.validate_every_epochs` must be >= 1, got "
                f"{self.validate_every_epochs}": self.validate_every_epochs >= 1,
                f"`schedule.validation_samples` must be >= 1, got {self.validation_samples}": (
                    self.validation_samples >= 1
                ),
                f"`schedule.patience_epochs` must be >= 1 or None, got {self.patience_epochs}": (
                    self.patience_epochs is None or self.patience_epochs >= 1
                ),
                f"`schedule.keep_checkpoints` must be >= 1, got {self.keep_checkpoints}": (
                    self.keep_checkpoints >= 1
                ),
            }
        )


PRIORS = ("normal", "dwp")
# The deep weight prior code starts the posterior tight: its decoders are tight.
DWP_INIT_LOG_VAR = -10.0


@dataclasses.dataclass(frozen=True)
class PriorConfig:
    """The prior over the Bayesian kernels and the weight of its KL term.

    Attributes:
      kind: `normal` (N(0, s²), s = `method.prior_scale`) or `dwp` (the deep weight prior).
      directory: the deep weight prior's folder (`python -m experiments.train_prior`).
      init_from_prior: the posterior means start from the prior's VAE samples.
      train_encoder: the prior's encoders are trained with q (Algorithm 1).
      kl_weight: β of the KL term (1: the ELBO; below 1: a tempered posterior).
      kl_warmup_epochs: β rises linearly from 0 over this many epochs.
    """

    kind: Literal["normal", "dwp"] = "normal"
    directory: str | None = None
    init_from_prior: bool = False
    train_encoder: bool = False
    kl_weight: float = 1.0
    kl_warmup_epochs: int = 0

    def __post_init__(self):
        dwp = self.kind == "dwp"
        _require(
            {
                f"`prior.kind` must be one of {list(PRIORS)}, got {self.kind!r}": (
                    self.kind in PRIORS
                ),
                "`prior.kind` dwp needs `prior.directory` (built by python -m "
                "experiments.train_prior)": not dwp or bool(self.directory),
                "`prior.directory` is only used with `prior.kind` dwp": (
                    dwp or self.directory is None
                ),
                "`prior.init_from_prior` needs `prior.kind` dwp": dwp or not self.init_from_prior,
                "`prior.train_encoder` needs `prior.kind` dwp": dwp or not self.train_encoder,
                f"`prior.kl_weight` must be >= 0, got {self.kl_weight}": self.kl_weight >= 0,
                f"`prior.kl_warmup_epochs` must be >= 0, got {self.kl_warmup_epochs}": (
                    self.kl_warmup_epochs >= 0
                ),
            }
        )


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Adam, its step decay (in `schedule`) and what it may change.

    Attributes:
      learning_rate: initial Adam step size.
      clip_norm: clip gradients to this global norm first; None disables clipping.
      frozen_layers: top-level layers never updated (fine-tuning).
      init_from: a trained deterministic run whose weights start this one.
    """

    learning_rate: float = 1e-3
    clip_norm: float | None = None
    frozen_layers: tuple[str, ...] = ()
    init_from: str | None = None

    def __post_init__(self):
        _require(
            {
                f"`optimizer.learning_rate` must be > 0, got {self.learning_rate}": (
                    self.learning_rate > 0
                ),
                f"`optimizer.clip_norm` must be > 0 or None, got {self.clip_norm}": (
                    self.clip_norm is None or self.clip_norm > 0
                ),
            }
        )


def dropout_for(method: str, dropout_rate: float) -> float:
    """The backbone dropout of a run of `method`: the method's default where it needs dropout
    and none is set."""
    rules = METHODS[method]
    return rules.default_dropout_rate if rules.needs_dropout and dropout_rate <= 0 else dropout_rate


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run: a section per concern, each checking its own fields; the rules
    across sections are checked here."""

    backbone: BackboneConfig = BackboneConfig()
    method: MethodConfig = MethodConfig()
    prior: PriorConfig = PriorConfig()
    likelihood: LikelihoodConfig = LikelihoodConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    data: DataConfig = DataConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: bfloat16 compute, float32 weights
    devices: int | None = None  # data-parallel devices; None: all that divide the batch
    preset: str = "custom"

    def __post_init__(self):
        dims, patch = self.backbone.spatial_dims, tuple(self.data.patch_shape)
        method = resolve_method(self.method)
        _require(
            {
                f"`data.patch_shape` needs {dims} numbers for `backbone.spatial_dims` {dims}, "
                f"got {list(patch)}": len(patch) == dims,
                "`prior.kind` dwp needs `method.method` vi": (
                    self.prior.kind != "dwp" or method.has_guide
                ),
                f"`precision` must be fp32 or bf16, got {self.precision!r}": (
                    self.precision in ("fp32", "bf16")
                ),
                f"`devices` must be >= 1, got {self.devices}": (
                    self.devices is None or self.devices >= 1
                ),
            }
        )
        method.check(self.backbone.dropout_rate)

    def optim(self) -> OptimConfig:
        return OptimConfig(
            learning_rate=self.optimizer.learning_rate,
            decay_every_steps=self.schedule.decay_every_epochs * self.schedule.steps_per_epoch,
            clip_norm=self.optimizer.clip_norm,
            frozen=tuple(self.optimizer.frozen_layers),
        )

    def with_method(self, name: str) -> TrainConfig:
        """This config trained by method `name`, with the backbone dropout it needs."""
        return dataclasses.replace(
            self,
            method=dataclasses.replace(self.method, method=name),
            backbone=dataclasses.replace(
                self.backbone, dropout_rate=dropout_for(name, self.backbone.dropout_rate)
            ),
        )

    def with_deep_weight_prior(self, directory: str, **prior) -> TrainConfig:
        """This config with the deep weight prior of `directory`, its posterior starting at
        the prior code's log-variance."""
        guide = dataclasses.replace(self.method.guide, init_log_var=DWP_INIT_LOG_VAR)
        return dataclasses.replace(
            self,
            prior=dataclasses.replace(self.prior, kind="dwp", directory=directory, **prior),
            method=dataclasses.replace(self.method, guide=guide),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of `to_dict`; also reads the flat layout of earlier versions."""

        def build(kind, values):
            fields = {f.name: f for f in dataclasses.fields(kind)}
            kwargs = {}
            for name, value in values.items():
                if name not in fields:
                    raise ValueError(f"unknown config field {kind.__name__}.{name}")
                sub = _NESTED.get((kind, name))
                if sub is not None:
                    kwargs[name] = build(sub, value)
                elif isinstance(value, list):
                    kwargs[name] = tuple(value)
                else:
                    kwargs[name] = value
            return kind(**kwargs)

        return build(cls, _sectioned(data))


# Fields of the flat layout (before sections) -> (section, field).
_FLAT_FIELDS = {
    "prior": ("prior", "kind"),
    "prior_dir": ("prior", "directory"),
    "dwp_init": ("prior", "init_from_prior"),
    "dwp_train_encoder": ("prior", "train_encoder"),
    "kl_weight": ("prior", "kl_weight"),
    "kl_warmup_epochs": ("prior", "kl_warmup_epochs"),
    "learning_rate": ("optimizer", "learning_rate"),
    "clip_norm": ("optimizer", "clip_norm"),
    "frozen_layers": ("optimizer", "frozen_layers"),
    "init_from": ("optimizer", "init_from"),
}


def _sectioned(data: dict[str, Any]) -> dict[str, Any]:
    """`data` in today's sections (a config.json of an earlier version keeps loading)."""
    if isinstance(data.get("prior"), dict):
        return data
    data = dict(data)
    flat = {old: data.pop(old) for old in _FLAT_FIELDS if old in data}
    for old, value in flat.items():
        section, name = _FLAT_FIELDS[old]
        data[section] = {**data.get(section, {}), name: value}
    return data


_NESTED = {
    (TrainConfig, "backbone"): BackboneConfig,
    (TrainConfig, "prior"): PriorConfig,
    (TrainConfig, "optimizer"): OptimizerConfig,
    (TrainConfig, "method"): MethodConfig,
    (TrainConfig, "likelihood"): LikelihoodConfig,
    (TrainConfig, "data"): DataConfig,
    (TrainConfig, "schedule"): ScheduleConfig,
    (MethodConfig, "guide"): GuideConfig,
}
