"""The segmentation likelihood and the negative ELBO.

Objective (method.md §5), minimised:

    loss = (N / B) · Σ_b [ce_weight · CE_b + dice_weight · SoftDice_b]  +  β_t · KL(q‖p)

- `B` is the number of examples in the batch, `N` the number of such examples in the
  whole training set, **counted in the same unit as the likelihood**: with whole volumes,
  N is the number of training volumes; with patches, a patch is the unit, so N is the
  number of patches that tile the training set (`num_data_for_patches`), so that the KL is
  counted once. (N/B)·Σ_b is an unbiased estimate of the full-data term only if every
  voxel is equally likely to be drawn. Foreground oversampling and border shifts break
  that. Per-voxel weights w from the sampler (`PatchSampler(unbiased_weights=True)`) restore
  it for the voxel-additive CE, as Σ_v w·CE_v. The soft Dice of a patch is not a sum over
  voxels; it is weighted by the patch's mean weight. Without weights (w ≡ 1) the objective
  is tempered: tumour voxels count more than their share of the data.
- CE_b is summed over voxels (`reduction="sum"`, the paper code) or averaged
  (`"mean"`). Only with `ce_weight=1, dice_weight=0, reduction="sum"` is the data term
  a true log-likelihood and the loss a true negative ELBO (tested against NumPyro's
  `Trace_ELBO`); the paper's 0.01/0.99 mix makes it a tempered objective.
- β_t = kl_weight · min(1, (t + 1) / kl_warmup_steps): a capped linear warm-up, because
  at initialisation the KL (about 2 nats per weight) dwarfs the data term of a few
  volumes. `kl_warmup_steps=0` disables it (the paper code: β = 1 from the start).
- `task="wt"`: two-class softmax, whole tumour vs rest (the paper). `task="regions"`:
  three sigmoid outputs WT, TC, ET (BraTS practice), CE and Dice averaged over regions.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from vi_seg_jax.task import TASKS, get_task

TaskName = Literal["wt", "regions"]


@dataclasses.dataclass(frozen=True)
class LikelihoodConfig:
    """Data term. Defaults are the paper code's (0.01 CE + 0.99 Dice, summed CE)."""

    task: TaskName = "wt"
    ce_weight: float = 0.01
    dice_weight: float = 0.99
    reduction: Literal["sum", "mean"] = "sum"
    dice_smooth: float = 1e-3

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)}, got {self.task!r}")
        if self.reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {self.reduction!r}")
        if self.ce_weight < 0 or self.dice_weight < 0 or self.ce_weight + self.dice_weight == 0:
            raise ValueError("ce_weight and dice_weight must be >= 0 and not both 0")

    @property
    def num_outputs(self) -> int:
        return get_task(self.task).num_outputs


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Scaling of the negative ELBO (see the module docstring)."""

    likelihood: LikelihoodConfig = LikelihoodConfig()
    num_data: float = 1.0
    kl_weight: float = 1.0
    kl_warmup_steps: int = 0


def num_data_for_patches(volume_shapes, patch_shape) -> float:
    """N in patch units: how many patches of `patch_shape` hold the training set's voxels."""
    voxels = sum(float(np.prod(shape)) for shape in volume_shapes)
    return voxels / float(np.prod(patch_shape))


def targets(labels: jax.Array, task: TaskName) -> jax.Array:
    """Canonical classes [B, *S] -> int WT labels [B, *S] or region masks [B, *S, 3] float."""
    return get_task(task).targets(labels)


def probabilities(logits: jax.Array, task: TaskName) -> jax.Array:
    """Softmax over classes (wt) or a sigmoid per region (regions)."""
    return get_task(task).probabilities(logits)


def foreground_probability(logits: jax.Array, task: TaskName) -> jax.Array:
    """P(whole tumour) per voxel [B, *S]."""
    task = get_task(task)
    return task.whole_tumour(task.probabilities(logits))


def data_term(
    logits: jax.Array,
    labels: jax.Array,
    config: LikelihoodConfig,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Per-example data loss [B] for logits [B, *S, K] and canonical labels [B, *S].

    `weights` [B, *S]: per-voxel weights of the CE; the Dice term of an example is scaled by
    their mean (module docstring). None: every voxel weighs 1.
    """
    spatial = tuple(range(1, labels.ndim))
    task = get_task(config.task)
    target = task.targets(labels)
    ce = task.cross_entropy(logits, target)
    dice = task.soft_dice_loss(logits, target, config.dice_smooth, spatial)
    if weights is not None:
        ce = ce * weights
        dice = dice * jnp.mean(weights, axis=spatial)
    ce = jnp.sum(ce, axis=spatial) if config.reduction == "sum" else jnp.mean(ce, axis=spatial)
    return config.ce_weight * ce + config.dice_weight * dice


def linear_warmup(step: jax.Array, warmup_steps: int) -> jax.Array:
    """min(1, (t + 1) / W) at 0-based step t: the first step already trains; 1 when W ≤ 0.

    The one warm-up of the project (the ELBO's KL weight and the kernel VAE's β).
    """
    if warmup_steps <= 0:
        return jnp.ones((), jnp.float32)
    return jnp.minimum(1.0, (jnp.asarray(step).astype(jnp.float32) + 1.0) / warmup_steps)


def kl_scale(step: jax.Array, config: ObjectiveConfig) -> jax.Array:
    """β_t: the KL weight times its capped linear warm-up."""
    return config.kl_weight * linear_warmup(step, config.kl_warmup_steps)


def scaled_data_term(
    logits: jax.Array,
    labels: jax.Array,
    config: ObjectiveConfig,
    weights: jax.Array | None = None,
) -> jax.Array:
    """(N / B) · Σ_b data_b, the minibatch estimate of the full-data term."""
    per_example = data_term(logits, labels, config.likelihood, weights)
    return (config.num_data / labels.shape[0]) * jnp.sum(per_example)


def hard_dice(
    logits: jax.Array, labels: jax.Array, task: TaskName, smooth: float = 1e-6
) -> jax.Array:
    """Whole-tumour Dice of the thresholded batch prediction (a training metric)."""
    predicted = foreground_probability(logits, task) > 0.5
    truth = targets(labels, "wt") > 0
    intersection = jnp.sum(predicted & truth, dtype=jnp.float32)
    total = jnp.sum(predicted, dtype=jnp.float32) + jnp.sum(truth, dtype=jnp.float32)
    return (2.0 * intersection + smooth) / (total + smooth)
