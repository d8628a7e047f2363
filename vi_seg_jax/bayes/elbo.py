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
import optax

from vi_seg_jax.data.conventions import REGION_CLASSES, REGION_NAMES

Task = Literal["wt", "regions"]


@dataclasses.dataclass(frozen=True)
class LikelihoodConfig:
    """Data term. Defaults are the paper code's (0.01 CE + 0.99 Dice, summed CE)."""

    task: Task = "wt"
    ce_weight: float = 0.01
    dice_weight: float = 0.99
    reduction: Literal["sum", "mean"] = "sum"
    dice_smooth: float = 1e-3

    def __post_init__(self):
        if self.task not in ("wt", "regions"):
            raise ValueError(f"task must be 'wt' or 'regions', got {self.task!r}")
        if self.reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {self.reduction!r}")
        if self.ce_weight < 0 or self.dice_weight < 0 or self.ce_weight + self.dice_weight == 0:
            raise ValueError("ce_weight and dice_weight must be >= 0 and not both 0")

    @property
    def num_outputs(self) -> int:
        return 2 if self.task == "wt" else len(REGION_NAMES)


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


def targets(labels: jax.Array, task: Task) -> jax.Array:
    """Canonical classes [B, *S] -> int WT labels [B, *S] or region masks [B, *S, 3] float."""
    if task == "wt":
        return jnp.isin(labels, jnp.asarray(REGION_CLASSES["wt"], labels.dtype)).astype(jnp.int32)
    masks = [jnp.isin(labels, jnp.asarray(REGION_CLASSES[r], labels.dtype)) for r in REGION_NAMES]
    return jnp.stack(masks, axis=-1).astype(jnp.float32)


def probabilities(logits: jax.Array, task: Task) -> jax.Array:
    """Softmax over classes (wt) or a sigmoid per region (regions)."""
    return jax.nn.softmax(logits, axis=-1) if task == "wt" else jax.nn.sigmoid(logits)


def foreground_probability(logits: jax.Array, task: Task) -> jax.Array:
    """P(whole tumour) per voxel [B, *S]."""
    probs = probabilities(logits, task)
    return probs[..., 1] if task == "wt" else probs[..., 0]


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
    target = targets(labels, config.task)
    if config.task == "wt":
        one_hot = jax.nn.one_hot(target, 2, dtype=logits.dtype)
        # One-hot cross-entropy, not the integer-label form: the latter's gradient is a
        # scatter of constants that XLA spends seconds constant-folding on 3D patches.
        ce = optax.softmax_cross_entropy(logits, one_hot)
        dice = optax.losses.dice_loss(
            logits, one_hot, smooth=config.dice_smooth, ignore_background=True
        )
    else:
        ce = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, target), axis=-1)
        # Each region is a binary problem: softmax([0, z]) = (1 − σ(z), σ(z)) per voxel.
        # (optax's apply_softmax=False path checks its input with Python control flow,
        # which fails under jit.)
        per_region = optax.losses.dice_loss(
            jnp.stack([jnp.zeros_like(logits), logits], axis=-1),
            jax.nn.one_hot(target.astype(jnp.int32), 2, dtype=logits.dtype),
            smooth=config.dice_smooth,
            ignore_background=True,
            axis=spatial,
        )
        dice = jnp.mean(per_region, axis=-1)
    if weights is not None:
        ce = ce * weights
        dice = dice * jnp.mean(weights, axis=spatial)
    ce = jnp.sum(ce, axis=spatial) if config.reduction == "sum" else jnp.mean(ce, axis=spatial)
    return config.ce_weight * ce + config.dice_weight * dice


def kl_scale(step: jax.Array, config: ObjectiveConfig) -> jax.Array:
    """β_t: the capped linear warm-up of the KL weight."""
    if config.kl_warmup_steps <= 0:
        return jnp.asarray(config.kl_weight, jnp.float32)
    ramp = jnp.minimum(1.0, (step.astype(jnp.float32) + 1.0) / config.kl_warmup_steps)
    return config.kl_weight * ramp


def scaled_data_term(
    logits: jax.Array,
    labels: jax.Array,
    config: ObjectiveConfig,
    weights: jax.Array | None = None,
) -> jax.Array:
    """(N / B) · Σ_b data_b, the minibatch estimate of the full-data term."""
    per_example = data_term(logits, labels, config.likelihood, weights)
    return (config.num_data / labels.shape[0]) * jnp.sum(per_example)


def hard_dice(logits: jax.Array, labels: jax.Array, task: Task, smooth: float = 1e-6) -> jax.Array:
    """Whole-tumour Dice of the thresholded batch prediction (a training metric)."""
    predicted = foreground_probability(logits, task) > 0.5
    truth = targets(labels, "wt") > 0
    intersection = jnp.sum(predicted & truth, dtype=jnp.float32)
    total = jnp.sum(predicted, dtype=jnp.float32) + jnp.sum(truth, dtype=jnp.float32)
    return (2.0 * intersection + smooth) / (total + smooth)
