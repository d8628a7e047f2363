"""Training really learns: each backbone and each method on a small synthetic set."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from vi_seg_jax.backbones import get_backbone
from vi_seg_jax.bayes.elbo import LikelihoodConfig, ObjectiveConfig
from vi_seg_jax.bayes.guide import GuideConfig
from vi_seg_jax.data.conventions import MODALITIES
from vi_seg_jax.data.preprocess import PreprocessConfig, preprocess
from vi_seg_jax.data.sampler import PatchSampler
from vi_seg_jax.data.synthetic import SyntheticConfig, generate_case
from vi_seg_jax.methods import MethodConfig
from vi_seg_jax.ops import ConvEngine
from vi_seg_jax.train.state import ModelSpec, OptimConfig, create_train_state
from vi_seg_jax.train.step import make_train_step

TINY = {
    "unet": {"features": (8, 16, 16, 32)},
    "vnet": {"features": (8, 16, 32)},
    "fcn": {"features": (8, 16, 16, 32)},
}


@pytest.fixture(scope="module")
def sampler():
    images, labels = [], []
    for index in range(4):
        case = generate_case(SyntheticConfig(shape=(48, 48, 32), seed=5), index)
        image = np.stack([case.images[m] for m in MODALITIES], axis=-1)
        prepared = preprocess(
            image, case.label, PreprocessConfig(multiple=8, min_shape=(32, 32, 8))
        )
        images.append(prepared.image)
        labels.append(prepared.label)
    return PatchSampler(images, labels, patch_shape=(32, 32), batch_size=8, foreground_fraction=0.6)


def _train(spec, sampler, steps, seed=0):
    init_key, data_key = jax.random.split(jax.random.key(seed))
    first = sampler.batch_at(data_key, 0)
    state = create_train_state(init_key, spec, first.images)
    step = make_train_step(spec)
    history = []
    for batch in sampler.iterate_batches(data_key, steps):
        state, metrics = step(state, (batch.images, batch.labels))
        history.append({k: float(v) for k, v in metrics.items()})
    return state, history


def _mean(history, key, part):
    """Mean over the first 10 steps or the last fifth of training."""
    values = [h[key] for h in history]
    return float(np.mean(values[:10] if part == "first" else values[-max(len(values) // 5, 1) :]))


def _spec(backbone, method="vi", **method_kwargs):
    net = get_backbone(backbone, num_classes=2, spatial_dims=2, **TINY[backbone])
    objective = ObjectiveConfig(
        LikelihoodConfig(ce_weight=0.5, dice_weight=0.5, reduction="mean"),
        num_data=64.0,
        kl_weight=1e-3,
        kl_warmup_steps=100,
    )
    return ModelSpec(
        net,
        MethodConfig(method=method, guide=GuideConfig(init_log_var=-9.0), **method_kwargs),
        objective,
        OptimConfig(learning_rate=3e-3),
    )


@pytest.mark.parametrize("backbone", ["unet", "vnet", "fcn"])
def test_variational_training_drives_loss_down_and_dice_up(sampler, backbone):
    _, history = _train(_spec(backbone), sampler, steps=200)
    assert all(np.isfinite(h["loss"]) for h in history)
    assert _mean(history, "data", "last") < 0.6 * _mean(history, "data", "first")
    assert _mean(history, "dice", "last") > _mean(history, "dice", "first") + 0.2
    assert _mean(history, "dice", "last") > 0.6


@pytest.mark.parametrize(
    "method,kwargs",
    [
        ("deterministic", {}),
        ("mc_dropout", {}),
        ("ensemble", {"ensemble_size": 2}),
        ("vi", {"estimator": "full"}),
        ("vi", {"num_particles": 2}),
    ],
)
def test_every_method_learns(sampler, method, kwargs):
    spec = _spec("unet", method, **kwargs)
    if method == "mc_dropout":
        spec = ModelSpec(
            spec.backbone.clone(dropout_rate=0.1), spec.method, spec.objective, spec.optim
        )
    state, history = _train(spec, sampler, steps=80)
    assert _mean(history, "data", "last") < 0.8 * _mean(history, "data", "first")
    assert _mean(history, "dice", "last") > _mean(history, "dice", "first")
    if method == "ensemble":
        leaves = jax.tree_util.tree_leaves(state.params)
        assert all(leaf.shape[0] == 2 for leaf in leaves)
        assert not np.allclose(leaves[0][0], leaves[0][1])  # members differ


def _grouped_convs(jaxpr) -> list[tuple[int, int]]:
    """(feature_group_count, batch_group_count) of every grouped conv, nested jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            groups = (eqn.params["feature_group_count"], eqn.params["batch_group_count"])
            if groups != (1, 1):
                found.append(groups)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _grouped_convs(sub)
    return found


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [("ensemble", {"ensemble_size": 2}), ("vi", {"estimator": "full", "num_particles": 2})],
)
def test_steps_over_per_member_kernels_avoid_grouped_convs(method, kwargs):
    # vmapped kernels make XLA's convs grouped (measured 3-5× slower on CPU): these steps
    # must trace the batched-GEMM formulation instead.
    net = get_backbone("unet", num_classes=2, spatial_dims=3, features=(4, 8))
    spec = ModelSpec(net, MethodConfig(method=method, **kwargs))
    images = jax.numpy.zeros((1, 8, 8, 8, 4), jax.numpy.float32)
    labels = jax.numpy.zeros((1, 8, 8, 8), jax.numpy.uint8)
    state = create_train_state(jax.random.key(0), spec, images)
    jaxpr = jax.make_jaxpr(make_train_step(spec))(state, (images, labels)).jaxpr
    assert _grouped_convs(jaxpr) == []

    # The check can fail: XLA's own convs under vmap are grouped.
    xla = ModelSpec(net.clone(conv=ConvEngine("xla")), MethodConfig(method=method, **kwargs))
    jaxpr = jax.make_jaxpr(make_train_step(xla))(state, (images, labels)).jaxpr
    assert _grouped_convs(jaxpr) != []


def test_frozen_layers_get_no_updates():
    from vi_seg_jax.train.state import make_optimizer, trainable_tree

    layers = {"down_3": {"kernel": jnp.ones(3)}, "up_1": {"kernel": jnp.ones(3)}}
    # A prior's parameters named like a layer (DWP groups are named "up_2", ...) still train.
    params = trainable_tree(layers, None, {"down_3": {"enc_out": jnp.ones(2)}})
    optimizer = make_optimizer(OptimConfig(learning_rate=0.1, frozen=("down_3",)))
    grads = jax.tree.map(jnp.ones_like, params)
    with jax.numpy_dtype_promotion("standard"):
        updates, _ = optimizer.update(grads, optimizer.init(params), params)
    np.testing.assert_array_equal(updates["params"]["down_3"]["kernel"], 0.0)
    assert np.all(np.asarray(updates["params"]["up_1"]["kernel"]) < 0)
    assert np.all(np.asarray(updates["prior"]["down_3"]["enc_out"]) < 0)


def test_bf16_training_computes_in_bfloat16_and_still_learns(sampler):
    fp32 = _spec("unet")
    spec = ModelSpec(fp32.backbone, fp32.method, fp32.objective, fp32.optim, precision="bf16")
    images = jnp.zeros((2, 32, 32, 4), jnp.float32)
    state = create_train_state(jax.random.key(0), spec, images)
    step = make_train_step(spec)
    text = step.lower(state, (images, jnp.zeros((2, 32, 32), jnp.uint8))).as_text()
    assert "bf16" in text  # the convolutions really run in bfloat16 ...
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(state.guide))

    trained, history = _train(spec, sampler, steps=200)
    # ... while the weights stay float32 and training converges as in fp32 (test above).
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(trained.guide))
    assert all(np.isfinite(h["loss"]) for h in history)
    assert _mean(history, "data", "last") < 0.6 * _mean(history, "data", "first")
    assert _mean(history, "dice", "last") > 0.6


def test_a_batch_with_voxel_weights_of_one_takes_the_unweighted_step(sampler):
    spec = _spec("unet")
    batch = sampler.batch_at(jax.random.key(4), 0)
    state = create_train_state(jax.random.key(0), spec, batch.images)
    step = make_train_step(spec)
    plain, plain_metrics = step(state, (batch.images, batch.labels))
    state = create_train_state(jax.random.key(0), spec, batch.images)
    ones = np.ones(batch.labels.shape, np.float32)
    weighted, metrics = step(state, (batch.images, batch.labels, ones))
    np.testing.assert_allclose(metrics["loss"], plain_metrics["loss"], rtol=1e-6)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        plain.guide,
        weighted.guide,
    )
    # Doubling every weight doubles the data term.
    state = create_train_state(jax.random.key(0), spec, batch.images)
    _, doubled = step(state, (batch.images, batch.labels, 2 * ones))
    np.testing.assert_allclose(doubled["data"], 2 * plain_metrics["data"], rtol=1e-5)


def test_augmentation_runs_inside_the_step_on_the_batch(sampler):
    """A deterministic network's update does not depend on the key, so a step that mirrors
    its batch equals a plain step on the mirrored batch; `augment=None` is the plain step."""
    import dataclasses

    from vi_seg_jax.data.augment import AugmentConfig

    plain = _spec("unet", "deterministic")
    mirrored = dataclasses.replace(plain, augment=AugmentConfig(mirror_p=(1.0, 0.0, 0.0)))
    init_key, data_key = jax.random.split(jax.random.key(3))
    batch = sampler.batch_at(data_key, 0)
    images, labels = jnp.asarray(batch.images), jnp.asarray(batch.labels)

    def one_step(spec, images, labels):
        state = create_train_state(init_key, spec, images)
        return make_train_step(spec)(state, (images, labels))

    with jax.numpy_dtype_promotion("standard"):
        state, metrics = one_step(mirrored, images, labels)
        expected_state, expected = one_step(plain, jnp.flip(images, 1), jnp.flip(labels, 1))
        _, unflipped = one_step(plain, images, labels)
    assert float(metrics["loss"]) == pytest.approx(float(expected["loss"]), rel=1e-5)
    assert float(metrics["loss"]) != pytest.approx(float(unflipped["loss"]), rel=1e-5)
    for ours, theirs in zip(
        jax.tree.leaves(state.params), jax.tree.leaves(expected_state.params), strict=True
    ):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
