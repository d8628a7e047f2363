"""The task registry: each task's outputs, targets and regions, and a new task plugged in by
the recipe in docs/architecture.md (a subclass of `Task` and an entry in `TASKS`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vi_seg_jax.bayes.elbo import LikelihoodConfig, data_term
from vi_seg_jax.calibration import region_names, region_probabilities, region_truth
from vi_seg_jax.data.conventions import CORE, EDEMA, ENHANCING, REGION_CLASSES
from vi_seg_jax.task import TASKS, Regions, Task, WholeTumour, get_task
from vi_seg_jax.uncertainty import entropy

CLASSES = np.array([[0, CORE], [EDEMA, ENHANCING]], np.uint8)


def test_whole_tumour_is_a_two_class_softmax_over_the_tumour_classes():
    task = get_task("wt")
    np.testing.assert_array_equal(task.targets(jnp.asarray(CLASSES)), CLASSES > 0)
    logits = jax.random.normal(jax.random.key(0), (2, 2, 2))
    probs = np.asarray(task.probabilities(logits))
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(task.region_probabilities(probs), probs[..., 1:2])
    np.testing.assert_array_equal(task.labels(probs[..., 1:2] > 0.5), probs[..., 1] > 0.5)
    want = -np.sum(probs * np.log(probs), -1)
    np.testing.assert_allclose(task.entropy(jnp.asarray(probs)), want, rtol=1e-5)


def test_regions_are_nested_sigmoids_decoded_back_to_classes():
    task = get_task("regions")
    masks = np.asarray(task.targets(jnp.asarray(CLASSES)), bool)
    for r, region in enumerate(task.regions):
        np.testing.assert_array_equal(masks[..., r], np.isin(CLASSES, REGION_CLASSES[region]))
    np.testing.assert_array_equal(task.labels(masks), CLASSES)
    np.testing.assert_array_equal(task.region_truth(CLASSES), masks)
    p = np.array([0.2, 0.5, 0.9], np.float32)
    binary = -(p * np.log(p) + (1 - p) * np.log(1 - p))
    np.testing.assert_allclose(task.entropy(jnp.asarray(p)), binary.sum(), rtol=1e-5)
    with pytest.raises(ValueError, match="task must be one of"):
        get_task("whole")


class EnhancingOnly(Task):
    """The recipe's example: enhancing tumour against the rest, as one sigmoid."""

    name = "et"
    regions = ("et",)
    num_outputs = 1

    def targets(self, labels):
        return jnp.isin(labels, jnp.asarray(REGION_CLASSES["et"], labels.dtype))[..., None].astype(
            jnp.float32
        )

    def probabilities(self, logits):
        return jax.nn.sigmoid(logits)

    def cross_entropy(self, logits, target):
        return Regions().cross_entropy(logits, target)

    def soft_dice_loss(self, logits, target, smooth, spatial):
        return Regions().soft_dice_loss(logits, target, smooth, spatial)

    def entropy(self, probs):
        return Regions().entropy(probs)

    def region_probabilities(self, probs):
        return probs

    def region_truth(self, classes):
        return np.isin(classes, REGION_CLASSES["et"])[..., None]

    def labels(self, region_masks):
        return np.where(region_masks[..., 0], ENHANCING, 0).astype(np.uint8)


def test_a_new_task_plugs_in_by_subclass_and_registry_entry(monkeypatch):
    monkeypatch.setitem(TASKS, "et", EnhancingOnly())
    config = LikelihoodConfig(task="et", ce_weight=1.0, dice_weight=0.0)
    assert config.num_outputs == 1
    labels = jnp.asarray(CLASSES)[None]
    logits = jnp.zeros((1, 2, 2, 1))
    # Summed CE of σ(0) = ½ everywhere: log 2 per voxel.
    np.testing.assert_allclose(data_term(logits, labels, config), 4 * np.log(2.0), rtol=1e-6)
    assert region_names("et") == ("et",)
    np.testing.assert_array_equal(region_truth(CLASSES, "et")[..., 0], CLASSES == ENHANCING)
    np.testing.assert_allclose(region_probabilities(np.full((2, 1), 0.3), "et"), 0.3)
    np.testing.assert_allclose(entropy(jnp.full((1,), 0.5), "et"), np.log(2.0), rtol=1e-6)
    assert isinstance(get_task("wt"), WholeTumour)
