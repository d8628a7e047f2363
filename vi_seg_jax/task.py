"""Segmentation tasks: what the network outputs and how that maps onto tumour regions.

A run's task is named in its likelihood config (`"wt"` or `"regions"`); `get_task(name)`
returns the `Task` object, the only place the name is looked at.

- `wt` (the paper): a two-class softmax, whole tumour against the rest. Its one region is WT,
  whose probability is the softmax's second channel.
- `regions` (BraTS practice): three independent sigmoids, one per nested region WT, TC, ET;
  the segmentation decodes the thresholded regions into classes (ET wins, then TC, then WT).

Adding a task: subclass `Task`, implement its hooks, add an instance to `TASKS` (see
docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vi_seg_jax.data.conventions import (
    REGION_CLASSES,
    REGION_NAMES,
    classes_from_regions,
    regions_from_classes,
)

# Keeps log(0) finite in entropies.
_TINY = 1e-12


@dataclasses.dataclass(frozen=True)
class Task:
    """How logits become per-region probabilities, labels and truth."""

    name: ClassVar[str]
    regions: ClassVar[tuple[str, ...]]
    num_outputs: ClassVar[int]

    def targets(self, labels: jax.Array) -> jax.Array:
        """Canonical classes [B, *S] -> the training targets."""
        raise NotImplementedError

    def probabilities(self, logits: jax.Array) -> jax.Array:
        """Logits [..., K] -> per-output probabilities [..., K]."""
        raise NotImplementedError

    def cross_entropy(self, logits: jax.Array, target: jax.Array) -> jax.Array:
        """Per-voxel cross-entropy [B, *S] of logits [B, *S, K] against `targets`."""
        raise NotImplementedError

    def soft_dice_loss(self, logits, target, smooth: float, spatial: tuple[int, ...]):
        """Per-example soft Dice loss [B] (foreground only)."""
        raise NotImplementedError

    def entropy(self, probs: jax.Array) -> jax.Array:
        """Entropy in nats of the outputs' distribution [...]."""
        raise NotImplementedError

    def region_probabilities(self, probs):
        """Per-output probabilities [..., K] -> per-region probabilities [..., R]."""
        raise NotImplementedError

    def region_truth(self, classes: np.ndarray) -> np.ndarray:
        """Canonical classes [...] -> per-region truth [..., R] (bool)."""
        return regions_from_classes(classes)[..., : len(self.regions)]

    def labels(self, region_masks: np.ndarray) -> np.ndarray:
        """Thresholded regions [..., R] (bool) -> the label map this task predicts."""
        raise NotImplementedError

    def release_labels(self, labels: np.ndarray, convention) -> np.ndarray:
        """`labels` as written to a `_seg` file of a dataset with this label `convention`."""
        return convention.from_canonical(labels)

    def predicted_regions(self, seg: np.ndarray, convention) -> np.ndarray:
        """A written `_seg` map -> its regions [..., R] (bool); inverse of `release_labels`."""
        return regions_from_classes(convention.to_canonical(seg))[..., : len(self.regions)]

    def whole_tumour(self, probs):
        """P(whole tumour) [...] from per-output probabilities [..., K]."""
        return self.region_probabilities(probs)[..., 0]


class WholeTumour(Task):
    name = "wt"
    regions = ("wt",)
    num_outputs = 2

    def targets(self, labels):
        return jnp.isin(labels, jnp.asarray(REGION_CLASSES["wt"], labels.dtype)).astype(jnp.int32)

    def probabilities(self, logits):
        return jax.nn.softmax(logits, axis=-1)

    def cross_entropy(self, logits, target):
        # One-hot cross-entropy, not the integer-label form: the latter's gradient is a
        # scatter of constants that XLA spends seconds constant-folding on 3D patches.
        return optax.softmax_cross_entropy(logits, jax.nn.one_hot(target, 2, dtype=logits.dtype))

    def soft_dice_loss(self, logits, target, smooth, spatial):
        one_hot = jax.nn.one_hot(target, 2, dtype=logits.dtype)
        return optax.losses.dice_loss(logits, one_hot, smooth=smooth, ignore_background=True)

    def entropy(self, probs):
        return -jnp.sum(probs * jnp.log(probs + _TINY), axis=-1)

    def region_probabilities(self, probs):
        return probs[..., 1:2]

    def labels(self, region_masks):
        return np.asarray(region_masks[..., 0], np.uint8)

    def release_labels(self, labels, convention):
        return labels  # a 0/1 whole-tumour mask in every release

    def predicted_regions(self, seg, convention):
        return (seg > 0)[..., None]


class Regions(Task):
    name = "regions"
    regions = REGION_NAMES
    num_outputs = len(REGION_NAMES)

    def targets(self, labels):
        masks = [
            jnp.isin(labels, jnp.asarray(REGION_CLASSES[r], labels.dtype)) for r in self.regions
        ]
        return jnp.stack(masks, axis=-1).astype(jnp.float32)

    def probabilities(self, logits):
        return jax.nn.sigmoid(logits)

    def cross_entropy(self, logits, target):
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, target), axis=-1)

    def soft_dice_loss(self, logits, target, smooth, spatial):
        # Each region is a binary problem: softmax([0, z]) = (1 − σ(z), σ(z)) per voxel.
        # (optax's apply_softmax=False path checks its input with Python control flow,
        # which fails under jit.)
        per_region = optax.losses.dice_loss(
            jnp.stack([jnp.zeros_like(logits), logits], axis=-1),
            jax.nn.one_hot(target.astype(jnp.int32), 2, dtype=logits.dtype),
            smooth=smooth,
            ignore_background=True,
            axis=spatial,
        )
        return jnp.mean(per_region, axis=-1)

    def entropy(self, probs):
        # Independent regions: the sum of their binary entropies.
        binary = -(probs * jnp.log(probs + _TINY) + (1.0 - probs) * jnp.log(1.0 - probs + _TINY))
        return jnp.sum(binary, axis=-1)

    def region_probabilities(self, probs):
        return probs

    def labels(self, region_masks):
        return classes_from_regions(region_masks)


TASKS: dict[str, Task] = {task.name: task for task in (WholeTumour(), Regions())}


def get_task(name: str) -> Task:
    """The `Task` named `name`."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"task must be one of {list(TASKS)}, got {name!r}") from None
