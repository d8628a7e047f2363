import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from numpyro import handlers
from numpyro.infer import Trace_ELBO, TraceMeanField_ELBO

from tests.bayes.tiny import TinyNet, tiny_batch
from vi_seg_jax.bayes import model as reference
from vi_seg_jax.bayes.elbo import (
    LikelihoodConfig,
    ObjectiveConfig,
    data_term,
    kl_scale,
    num_data_for_patches,
    scaled_data_term,
    targets,
)
from vi_seg_jax.bayes.guide import (
    GuideConfig,
    bayesian_paths,
    init_guide,
    sample_kernels,
    split_params,
)
from vi_seg_jax.bayes.layers import apply_sampled
from vi_seg_jax.bayes.priors import NormalPrior
from vi_seg_jax.methods import MethodConfig
from vi_seg_jax.train.state import (
    ModelSpec,
    TrainState,
    create_train_state,
    trainable_tree,
)
from vi_seg_jax.train.step import loss_fn

NUM_DATA = 10
TRUE_NLL = ObjectiveConfig(
    LikelihoodConfig(ce_weight=1.0, dice_weight=0.0, reduction="sum"), num_data=NUM_DATA
)


@pytest.fixture(scope="module")
def tiny():
    images, labels = tiny_batch()
    net = TinyNet()
    params = net.init(jax.random.key(0), images)["params"]
    kernels, rest = split_params(params, bayesian_paths(params))
    guide = init_guide(jax.random.key(2), kernels, GuideConfig(init_loc_std=0.3, init_log_var=-3.0))
    shapes = {p: v.shape for p, v in traverse_util.flatten_dict(kernels).items()}
    numpyro_model = functools.partial(
        reference.model, backbone=net, deterministic=rest, kernel_shapes=shapes, num_data=NUM_DATA
    )
    numpyro_guide = functools.partial(reference.guide, init=guide)
    return net, rest, guide, images, labels, numpyro_model, numpyro_guide


def _our_loss(tiny, kernels):
    net, rest, guide, images, labels, *_ = tiny
    logits, _ = apply_sampled(net, rest, kernels, images)
    return scaled_data_term(logits, labels, TRUE_NLL) + NormalPrior(1.0).kl(guide)


def test_equals_numpyro_mean_field_elbo_for_the_same_key(tiny):
    *_, numpyro_model, numpyro_guide = tiny
    guide, images, labels = tiny[2], tiny[3], tiny[4]
    key = jax.random.key(7)
    params = reference.guide_param_map(guide)
    theirs = TraceMeanField_ELBO().loss(key, params, numpyro_model, numpyro_guide, images, labels)
    # NumPyro seeds the guide with the second half of split(key) (one particle).
    _, guide_seed = jax.random.split(key)
    trace = handlers.trace(
        handlers.seed(handlers.substitute(numpyro_guide, data=params), guide_seed)
    ).get_trace(images, labels)
    draws = {
        tuple(name.split(".")): site["value"]
        for name, site in trace.items()
        if site["type"] == "sample"
    }
    ours = _our_loss(tiny, traverse_util.unflatten_dict(draws))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)


def test_agrees_with_numpyro_trace_elbo_within_monte_carlo_error(tiny):
    *_, numpyro_model, numpyro_guide = tiny
    guide, images, labels = tiny[2], tiny[3], tiny[4]
    params = reference.guide_param_map(guide)
    n = 2000
    # Two independent unbiased estimates of the negative ELBO, one particle per key:
    # NumPyro's (log q − log p − log-likelihood, all by sampling) and ours (sampled data
    # term + closed-form KL). Their difference has standard error sqrt(σ₁²/n + σ₂²/n).
    theirs = jax.lax.map(
        lambda k: Trace_ELBO().loss(k, params, numpyro_model, numpyro_guide, images, labels),
        jax.random.split(jax.random.key(1), n),
        batch_size=250,
    )
    ours = jax.lax.map(
        lambda k: _our_loss(tiny, sample_kernels(k, guide)),
        jax.random.split(jax.random.key(2), n),
        batch_size=250,
    )
    theirs, ours = np.asarray(theirs, np.float64), np.asarray(ours, np.float64)
    stderr = np.sqrt(theirs.var(ddof=1) / n + ours.var(ddof=1) / n)
    # The check has power: a KL counted half or twice would move the loss by many stderr.
    assert 4 * stderr < 0.25 * float(NormalPrior(1.0).kl(guide))
    assert abs(ours.mean() - theirs.mean()) < 4 * stderr


def test_train_step_loss_is_the_negative_elbo(tiny):
    net, rest, guide, images, labels, *_ = tiny
    spec = ModelSpec(net, MethodConfig(method="vi", estimator="full"), TRUE_NLL)
    trainable = trainable_tree(rest, guide, None)
    key = jax.random.key(4)
    loss, metrics = loss_fn(trainable, images, labels, key, jnp.zeros((), jnp.int32), spec)
    data_key, _ = jax.random.split(key)
    (particle_key,) = jax.random.split(data_key, 1)
    noise_key, _ = jax.random.split(particle_key)
    np.testing.assert_allclose(loss, _our_loss(tiny, sample_kernels(noise_key, guide)), rtol=1e-5)
    np.testing.assert_allclose(metrics["kl"], NormalPrior(1.0).kl(guide), rtol=1e-6)


def test_particles_vmapped_equal_a_python_loop(tiny):
    net, rest, guide, images, labels, *_ = tiny
    trainable = trainable_tree(rest, guide, None)
    step = jnp.zeros((), jnp.int32)
    key = jax.random.key(9)
    for estimator in ("lrt", "full"):
        many = ModelSpec(net, MethodConfig(estimator=estimator, num_particles=4), TRUE_NLL)
        one = ModelSpec(net, MethodConfig(estimator=estimator, num_particles=1), TRUE_NLL)
        vmapped, _ = loss_fn(trainable, images, labels, key, step, many)
        data_key, _ = jax.random.split(key)
        loop = []
        for particle_key in jax.random.split(data_key, 4):
            # A one-particle data key whose single split yields `particle_key`.
            loop.append(
                jax.jit(functools.partial(_one_particle_data, spec=one))(
                    trainable, images, labels, particle_key
                )
            )
        expected = np.mean(loop) + float(NormalPrior(1.0).kl(guide))
        np.testing.assert_allclose(vmapped, expected, rtol=1e-5)


def _one_particle_data(trainable, images, labels, particle_key, spec):
    from vi_seg_jax.bayes.layers import apply_lrt

    noise_key, _ = jax.random.split(particle_key)
    if spec.method.estimator == "lrt":
        logits, _ = apply_lrt(
            spec.backbone, trainable["params"], trainable["guide"], images, key=noise_key
        )
    else:
        logits, _ = apply_sampled(
            spec.backbone,
            trainable["params"],
            sample_kernels(noise_key, trainable["guide"]),
            images,
        )
    return scaled_data_term(logits, labels, spec.objective)


def test_patch_scaling_counts_n_in_patch_units():
    """(N/B)·Σ over a uniformly drawn patch is unbiased for the whole-volume term."""
    key = jax.random.key(0)
    logits = jax.random.normal(key, (1, 8, 8, 2))
    labels = (jax.random.uniform(jax.random.key(1), (1, 8, 8)) > 0.5).astype(jnp.uint8)
    ce_only = LikelihoodConfig(ce_weight=1.0, dice_weight=0.0, reduction="sum")
    whole = float(data_term(logits, labels, ce_only)[0])
    patches = [(slice(i, i + 4), slice(j, j + 4)) for i in (0, 4) for j in (0, 4)]
    n = num_data_for_patches([(8, 8)], (4, 4))
    assert n == 4
    objective = ObjectiveConfig(ce_only, num_data=n)
    estimates = [
        float(scaled_data_term(logits[:, a, b], labels[:, a, b], objective)) for a, b in patches
    ]
    np.testing.assert_allclose(np.mean(estimates), whole, rtol=1e-5)


@pytest.mark.parametrize("task", ["wt", "regions"])
def test_voxel_weights_scale_each_voxels_ce_and_each_patchs_dice(task):
    logits = jax.random.normal(jax.random.key(0), (2, 5, 4, 2 if task == "wt" else 3))
    labels = jax.random.randint(jax.random.key(1), (2, 5, 4), 0, 4).astype(jnp.uint8)
    weights = jax.random.uniform(jax.random.key(2), (2, 5, 4), minval=0.2, maxval=3.0)
    ce_only = LikelihoodConfig(task=task, ce_weight=1.0, dice_weight=0.0)
    dice_only = LikelihoodConfig(task=task, ce_weight=0.0, dice_weight=1.0)
    # The CE against NumPy: Σ_v w_v · (−log p(y_v)).
    x = np.asarray(logits, np.float64)
    target = np.asarray(targets(labels, task))
    if task == "wt":
        log_p = x - np.log(np.exp(x).sum(-1, keepdims=True))
        ce = -np.take_along_axis(log_p, target[..., None], -1)[..., 0]
    else:
        ce = np.mean(np.logaddexp(0, -x) * target + np.logaddexp(0, x) * (1 - target), -1)
    want = np.sum(np.asarray(weights) * ce, axis=(1, 2))
    np.testing.assert_allclose(data_term(logits, labels, ce_only, weights), want, rtol=1e-5)
    # Dice is scaled by the patch's mean weight; weights of one change nothing.
    mean_weight = np.asarray(weights).mean(axis=(1, 2))
    np.testing.assert_allclose(
        data_term(logits, labels, dice_only, weights),
        mean_weight * np.asarray(data_term(logits, labels, dice_only)),
        rtol=1e-5,
    )
    mixed = LikelihoodConfig(task=task)
    np.testing.assert_array_equal(
        data_term(logits, labels, mixed, jnp.ones_like(weights)), data_term(logits, labels, mixed)
    )


def test_batch_scaling_is_n_over_b():
    logits = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
    labels = jnp.ones((3, 4, 4), jnp.uint8)
    objective = ObjectiveConfig(LikelihoodConfig(), num_data=12)
    per_example = data_term(logits, labels, objective.likelihood)
    np.testing.assert_allclose(
        scaled_data_term(logits, labels, objective), 12 / 3 * per_example.sum(), rtol=1e-6
    )


def test_kl_warmup_is_linear_then_capped():
    objective = ObjectiveConfig(kl_weight=0.5, kl_warmup_steps=10)
    values = [float(kl_scale(jnp.asarray(t), objective)) for t in (0, 4, 9, 10, 1000)]
    np.testing.assert_allclose(values, [0.05, 0.25, 0.5, 0.5, 0.5], rtol=1e-6)
    assert float(kl_scale(jnp.asarray(0), ObjectiveConfig(kl_weight=1.0))) == 1.0


def test_dice_term_of_a_perfect_prediction_is_near_zero():
    labels = jnp.asarray([[[0, 1], [3, 2]]], jnp.uint8)
    wt = jnp.asarray([[[0, 1], [1, 1]]])
    logits = 30.0 * (jax.nn.one_hot(wt, 2) - 0.5)
    dice_only = LikelihoodConfig(ce_weight=0.0, dice_weight=1.0)
    assert float(data_term(logits, labels, dice_only)[0]) < 1e-4
    assert float(data_term(-logits, labels, dice_only)[0]) > 0.99
    regions = jnp.stack([wt > 0, (wt > 0) & (labels != 2), labels == 3], -1)
    region_logits = 30.0 * (regions.astype(jnp.float32) - 0.5)
    assert (
        float(data_term(region_logits, labels, LikelihoodConfig(task="regions", ce_weight=0.0))[0])
        < 1e-4
    )


def test_region_dice_is_the_mean_binary_soft_dice_and_compiles():
    labels = jax.random.randint(jax.random.key(0), (2, 4, 4), 0, 4).astype(jnp.uint8)
    logits = jax.random.normal(jax.random.key(1), (2, 4, 4, 3))
    config = LikelihoodConfig(task="regions", ce_weight=0.0, dice_weight=1.0, dice_smooth=1e-6)
    # Reference: per example and region, 1 − 2Σpy / (Σp + Σy) of the foreground.
    p = np.asarray(jax.nn.sigmoid(logits), np.float64)
    y = np.asarray(targets(labels, "regions"), np.float64)
    expected = np.mean(
        1 - 2 * (p * y).sum((1, 2)) / (p.sum((1, 2)) + y.sum((1, 2)) + 1e-6), axis=-1
    )
    jitted = jax.jit(data_term, static_argnums=2)
    np.testing.assert_allclose(jitted(logits, labels, config), expected, rtol=1e-4)


def test_bad_likelihood_settings_are_refused():
    with pytest.raises(ValueError, match="task must be"):
        LikelihoodConfig(task="brain")
    with pytest.raises(ValueError, match="reduction must be"):
        LikelihoodConfig(reduction="max")
    with pytest.raises(ValueError, match="not both 0"):
        LikelihoodConfig(ce_weight=0.0, dice_weight=0.0)


def test_create_train_state_splits_bayesian_and_deterministic(tiny):
    net, _, _, images, _, *_ = tiny
    state = create_train_state(jax.random.key(0), ModelSpec(net), images)
    assert isinstance(state, TrainState)
    assert set(state.params) == {"head"}
    assert set(state.guide.loc) == {"conv_1", "conv_2"}
