"""A run's static model and preprocessing, from its configuration.

Shared by training and prediction, so a restored run is built exactly as it was trained.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vi_seg_jax.backbones import get_backbone
from vi_seg_jax.bayes.elbo import ObjectiveConfig
from vi_seg_jax.bayes.guide import bayesian_paths
from vi_seg_jax.bayes.priors import NormalPrior
from vi_seg_jax.data.augment import get_augmentation
from vi_seg_jax.data.preprocess import PreprocessConfig
from vi_seg_jax.train.config import TrainConfig
from vi_seg_jax.train.state import ModelSpec


def build_spec(config: TrainConfig, num_data: float, *, with_prior: bool = True) -> ModelSpec:
    """The static model description of a run.

    `with_prior=False` skips loading a deep weight prior (prediction does not need it) and
    puts the N(0, s²) prior in its place.
    """
    backbone = get_backbone(
        config.backbone.name, num_classes=config.likelihood.num_outputs, **config.backbone.kwargs()
    )
    objective = ObjectiveConfig(
        likelihood=config.likelihood,
        num_data=num_data,
        kl_weight=config.prior.kl_weight,
        kl_warmup_steps=config.prior.kl_warmup_epochs * config.schedule.steps_per_epoch,
    )
    prior = NormalPrior(config.method.prior_scale)
    if config.prior.kind == "dwp" and with_prior:
        prior = _deep_weight_prior(config, backbone, prior)
    return ModelSpec(
        backbone,
        config.method,
        objective,
        config.optim(),
        prior,
        config.precision,
        get_augmentation(config.data.augment),
    )


def _deep_weight_prior(config: TrainConfig, backbone, fallback: NormalPrior):
    from vi_seg_jax.dwp.prior import load_prior

    dims = config.backbone.spatial_dims
    sample = jnp.zeros((1, *(2**backbone.depth,) * dims, len(config.data.modalities)))
    shapes = jax.eval_shape(backbone.init, jax.random.key(0), sample)["params"]
    return load_prior(
        config.prior.directory,
        backbone=config.backbone.name,
        spatial_dims=dims,
        paths=bayesian_paths(shapes),
        fallback=fallback,
        train_encoder=config.prior.train_encoder,
    )


def backbone_multiple(config: TrainConfig) -> int:
    """Spatial sizes must be multiples of 2**depth of the backbone."""
    return 2 ** get_backbone(config.backbone.name, num_classes=2, **config.backbone.kwargs()).depth


def preprocess_config_for(config: TrainConfig) -> PreprocessConfig:
    """How a run's cases are preprocessed (training, validation and prediction alike)."""
    patch = tuple(config.data.patch_shape)
    return PreprocessConfig(
        normalization=config.data.normalization,
        multiple=backbone_multiple(config),
        min_shape=patch if len(patch) == 3 else (*patch, 1),
    )
