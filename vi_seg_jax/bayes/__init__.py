"""The Bayesian layer over plain backbones: guide, priors, estimators, objective."""

from vi_seg_jax.bayes.elbo import LikelihoodConfig, ObjectiveConfig, num_data_for_patches
from vi_seg_jax.bayes.guide import (
    GuideConfig,
    GuideParams,
    bayesian_paths,
    init_guide,
    sample_kernels,
)
from vi_seg_jax.bayes.layers import apply_backbone, apply_lrt, apply_sampled
from vi_seg_jax.bayes.priors import NormalPrior, Prior

__all__ = [
    "GuideConfig",
    "GuideParams",
    "LikelihoodConfig",
    "NormalPrior",
    "ObjectiveConfig",
    "Prior",
    "apply_backbone",
    "apply_lrt",
    "apply_sampled",
    "bayesian_paths",
    "init_guide",
    "num_data_for_patches",
    "sample_kernels",
]
