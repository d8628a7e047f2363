"""The deep weight prior's KL bound, layer groups, kernel collection and prior folders."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import logsumexp

from vi_seg_jax.backbones import get_backbone
from vi_seg_jax.bayes.guide import (
    GuideConfig,
    GuideParams,
    bayesian_paths,
    init_guide,
    split_params,
)
from vi_seg_jax.bayes.priors import NormalPrior
from vi_seg_jax.dwp.kernels import (
    collect_kernels,
    default_groups,
    kernel_slices,
    path_name,
)
from vi_seg_jax.dwp.prior import (
    DeepWeightPrior,
    bound_terms,
    group_kl_bound,
    guide_rows,
    init_locations_from_prior,
    load_prior,
    write_prior,
)
from vi_seg_jax.dwp.vae import ENCODER_MODULES, VAEConfig, decode, init_vae
from vi_seg_jax.errors import DataError


def _log_prior_by_quadrature(params, config, w, half_width=7.0, points=141):
    """log p(w) = log ∫ p(w|z) N(z; 0, I) dz on a grid over a 2D latent."""
    axis = np.linspace(-half_width, half_width, points)
    grid = np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    mu, log_var = (
        np.asarray(a, np.float64) for a in decode(params, config, jnp.asarray(grid, jnp.float32))
    )
    log_pz = -0.5 * np.sum(grid**2, -1) - np.log(2 * np.pi)
    cell = np.log((axis[1] - axis[0]) ** 2)

    def log_p(rows):  # in chunks of w: [rows, grid, D] float64 stays small
        rows = np.asarray(rows, np.float64)[:, None, :]
        log_pw_z = -0.5 * np.sum(
            np.log(2 * np.pi) + log_var + (rows - mu) ** 2 / np.exp(log_var), -1
        )
        return logsumexp(log_pw_z + log_pz + cell, axis=1)

    return np.concatenate([log_p(chunk) for chunk in np.array_split(w, -(-len(w) // 200))])


def _true_kl(params, config, loc, log_var, samples=400):
    """KL(q‖p) = −H[q] + E_q[−log p(w)]: Monte Carlo over w, quadrature over z; and the w."""
    rows = loc.shape[0]
    noise = jax.random.normal(jax.random.key(2), (samples, rows, config.kernel_dim))
    w = (loc[None] + jnp.exp(0.5 * log_var)[None] * noise).reshape(-1, config.kernel_dim)
    neg_log_p = -_log_prior_by_quadrature(params, config, w)
    neg_entropy = -0.5 * float(jnp.sum(np.log(2 * np.pi) + 1 + log_var))
    return neg_entropy + rows * neg_log_p.mean(), neg_entropy, w, neg_log_p


@pytest.fixture(scope="module")
def small_vae():
    config = VAEConfig(spatial_dims=2, latent_dim=2, hidden=16)
    return init_vae(jax.random.key(0), config), config


def test_the_bound_is_above_the_true_kl(small_vae):
    params, config = small_vae
    rows = 3
    loc = 0.5 * jax.random.normal(jax.random.key(1), (rows, config.kernel_dim))
    log_var = jnp.full((rows, config.kernel_dim), -1.0)
    true_kl, neg_entropy, w, neg_log_p = _true_kl(params, config, loc, log_var)

    # The bound's expectation, per w sample (with the same w): gap ≥ 0 for every w.
    z_noise = jax.random.normal(jax.random.key(3), (w.shape[0], config.latent_dim))
    bound = np.asarray(bound_terms(params, config, w, z_noise))
    gap = bound - neg_log_p
    assert gap.mean() > 3 * gap.std() / np.sqrt(gap.size)

    # `group_kl_bound` (its own noise) estimates −H[q] + E[bound] ≥ true KL on average.
    estimates = np.array(
        [
            float(group_kl_bound(params, config, loc, log_var, jax.random.key(100 + i)))
            for i in range(200)
        ]
    )
    standard_error = estimates.std() / np.sqrt(estimates.size)
    assert estimates.mean() >= true_kl - 3 * standard_error
    expected = neg_entropy + rows * bound.mean()
    assert estimates.mean() == pytest.approx(
        expected, abs=5 * standard_error + 0.05 * abs(expected)
    )


def test_training_the_encoder_tightens_the_bound_which_stays_above_the_true_kl(small_vae):
    vae_params, config = small_vae
    rows = 3  # one [3, 3, 1, 3] kernel: three slices
    loc = 0.5 * jax.random.normal(jax.random.key(1), (rows, config.kernel_dim))
    log_var = jnp.full((rows, config.kernel_dim), -1.0)
    true_kl = _true_kl(vae_params, config, loc, log_var)[0]
    as_kernel = lambda rows_: rows_.T.reshape(3, 3, 1, rows)  # noqa: E731 (guide_rows⁻¹)
    guide = GuideParams(loc={"conv": as_kernel(loc)}, log_var={"conv": as_kernel(log_var)})
    prior = DeepWeightPrior(
        vaes={"g": (vae_params, config)}, groups={"g": (("conv",),)}, train_encoder=True
    )
    encoders = prior.init_params()
    assert set(encoders["g"]) == set(ENCODER_MODULES)  # only r_ψ is trained
    assert dataclasses.replace(prior, train_encoder=False).init_params() is None

    estimate = jax.jit(lambda params, key: prior.kl(guide, key, params))

    def mean_bound(params, first_key):
        keys = [jax.random.key(first_key + i) for i in range(300)]
        values = np.array([float(estimate(params, key)) for key in keys])
        return values.mean(), values.std() / np.sqrt(values.size)

    optimizer = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state, key):
        grads = jax.grad(lambda p: prior.kl(guide, key, p))(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state

    trained, opt_state = encoders, optimizer.init(encoders)
    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction
        for i in range(300):
            trained, opt_state = step(trained, opt_state, jax.random.key(10_000 + i))
    before, before_error = mean_bound(encoders, 100)
    after, after_error = mean_bound(trained, 100)
    assert after < before - 3 * np.hypot(before_error, after_error)  # tighter ...
    assert after - true_kl < 0.5 * (before - true_kl)  # ... by more than half the gap
    assert after >= true_kl - 3 * after_error  # still an upper bound


def test_the_bound_is_evaluated_in_chunks_with_the_same_result(small_vae):
    params, config = small_vae
    loc = jax.random.normal(jax.random.key(4), (37, config.kernel_dim))
    log_var = jnp.full_like(loc, -2.0)
    key = jax.random.key(5)
    whole = group_kl_bound(params, config, loc, log_var, key, chunk_size=64)
    chunked = group_kl_bound(params, config, loc, log_var, key, chunk_size=5)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5)


def _unet(features=(4, 8, 8, 16), dims=3):
    net = get_backbone("unet", num_classes=2, spatial_dims=dims, features=features)
    shape = (1, *(2**net.depth,) * dims, 4)
    params = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros(shape))["params"]
    params = jax.tree.map(lambda s: jax.random.normal(jax.random.key(1), s.shape), params)
    return net, params


def test_paper_unet_gets_the_dwp_codes_seven_groups():
    _, params = _unet()
    groups = default_groups("unet", bayesian_paths(params))
    named = {
        g: [path_name(p).removesuffix("/kernel") for p in paths] for g, paths in groups.items()
    }
    assert named == {
        "encoder_1": ["init", "down_1/conv_1"],
        "encoder_2": ["down_1/conv_2", "down_2/conv_1", "down_2/conv_2", "down_3/conv_1"],
        "encoder_3": ["down_3/conv_2", "down_4/conv_1", "down_4/conv_2", "down_5/conv_1"],
        "encoder_4": ["down_5/conv_2", "down_6/conv_1", "down_6/conv_2"]
        + [f"bottleneck_{i}/conv_{j}" for i in (1, 2, 3) for j in (1, 2)],
        "up_1": ["up_1/conv_1", "up_1/conv_2"],
        "up_2": ["up_2/conv_1", "up_2/conv_2"],
        "up_3": ["up_3/conv_1", "up_3/conv_2"],
    }


@pytest.mark.parametrize("backbone", ["vnet", "fcn"])
def test_other_backbones_cover_every_kernel_once_in_forward_order(backbone):
    net = get_backbone(backbone, num_classes=2, spatial_dims=2, features=(4, 8, 8, 16))
    params = net.init(jax.random.key(0), jnp.zeros((1, 8, 8, 4)))["params"]
    paths = bayesian_paths(params)
    groups = default_groups(backbone, paths)
    flat = [p for group in groups.values() for p in group]
    assert sorted(flat) == sorted(paths) and len(flat) == len(set(flat))
    assert [g for g in groups if g.startswith("encoder")] == [f"encoder_{i}" for i in (1, 2, 3, 4)]


def test_kernel_slices_are_channel_pairs_and_small_ones_are_dropped():
    kernel = np.arange(3 * 3 * 2 * 4, dtype=np.float32).reshape(3, 3, 2, 4)
    rows = kernel_slices(kernel)
    assert rows.shape == (8, 9)
    np.testing.assert_array_equal(rows[1 * 4 + 3], kernel[:, :, 1, 3].ravel())
    np.testing.assert_array_equal(np.asarray(guide_rows(jnp.asarray(kernel))), rows)
    kernel[:, :, 0, 0] = 1e-4  # a dead filter
    collected = collect_kernels([{"a": {"kernel": kernel}}], {"g": [("a", "kernel")]})
    assert collected["g"].shape == (7, 9)


def _prior_folder(tmp_path, params, backbone="unet", dims=3, latent=2, gaussian_groups=None):
    groups = default_groups(backbone, bayesian_paths(params))
    config = VAEConfig(spatial_dims=dims, latent_dim=latent, hidden=8)
    vaes = {name: (init_vae(jax.random.key(i), config), config) for i, name in enumerate(groups)}
    kernels = collect_kernels([params], groups)
    return write_prior(
        tmp_path / "prior",
        backbone=backbone,
        spatial_dims=dims,
        groups=groups,
        kernels=kernels,
        vaes=vaes,
        reports={},
        gaussian_groups=gaussian_groups,
    )


def test_prior_folder_round_trip_and_the_kl_splits_by_coverage(tmp_path):
    _, params = _unet()
    folder = _prior_folder(tmp_path, params)
    paths = bayesian_paths(params)
    prior = load_prior(folder, backbone="unet", spatial_dims=3, paths=paths)
    assert isinstance(prior, DeepWeightPrior) and len(prior.groups) == 7
    kernels, _ = split_params(params, paths)
    guide = init_guide(jax.random.key(1), kernels, GuideConfig())
    key = jax.random.key(2)
    kl = prior.kl(guide, key)
    # Every 3×3×3 kernel of the U-Net is covered: the sum of the groups' bounds, each with
    # its own key ...
    loc, log_var = _flat(guide.loc), _flat(guide.log_var)
    expected = 0.0
    for group_key, name in zip(jax.random.split(key, 7), sorted(prior.groups), strict=True):
        rows = [
            jnp.concatenate([guide_rows(a[p]) for p in prior.groups[name]]) for a in (loc, log_var)
        ]
        expected += float(group_kl_bound(*prior.vaes[name], *rows, group_key))
    assert float(kl) == pytest.approx(expected, rel=1e-5)
    # ... and without groups, the closed-form N(0, 1) KL.
    empty = dataclasses.replace(prior, groups={}, vaes={})
    assert float(empty.kl(guide, key)) == pytest.approx(float(NormalPrior().kl(guide)), rel=1e-6)


def _flat(tree):
    from flax import traverse_util

    return traverse_util.flatten_dict(dict(tree))


def test_a_prior_for_another_network_is_refused(tmp_path):
    _, params = _unet()
    folder = _prior_folder(tmp_path, params)
    paths = bayesian_paths(params)
    with pytest.raises(DataError, match="built for backbone unet, this run uses vnet"):
        load_prior(folder, backbone="vnet", spatial_dims=3, paths=paths)
    with pytest.raises(DataError, match="3\\^3 kernels, this run has 3\\^2"):
        load_prior(folder, backbone="unet", spatial_dims=2, paths=paths)
    _, deeper = _unet(features=(4, 8, 8, 16, 16))
    with pytest.raises(DataError, match="layer grouping"):
        load_prior(folder, backbone="unet", spatial_dims=3, paths=bayesian_paths(deeper))
    with pytest.raises(DataError, match=r"no manifest\.json"):
        load_prior(tmp_path, backbone="unet", spatial_dims=3, paths=paths)


def test_dwp_initialisation_draws_locations_from_the_vaes(tmp_path):
    _, params = _unet()
    folder = _prior_folder(tmp_path, params)
    paths = bayesian_paths(params)
    prior = load_prior(folder, backbone="unet", spatial_dims=3, paths=paths)
    kernels, _ = split_params(params, paths)
    guide = init_guide(jax.random.key(1), kernels, GuideConfig())
    initial = init_locations_from_prior(jax.random.key(3), guide, prior)
    before, after = guide.loc["init"]["kernel"], initial.loc["init"]["kernel"]
    assert after.shape == before.shape and not np.allclose(after, before)
    # The decoder's own scale (random init: ~unit variance), not the 0.02 of the default init.
    assert float(jnp.std(after)) > 5 * float(jnp.std(before))
    np.testing.assert_array_equal(
        initial.log_var["init"]["kernel"], guide.log_var["init"]["kernel"]
    )


def test_groups_whose_vae_lost_take_their_gaussian_in_closed_form(tmp_path):
    _, params = _unet()
    paths = bayesian_paths(params)
    names = sorted(default_groups("unet", paths))
    variance = {names[0]: 0.04, names[3]: 0.25}
    folder = _prior_folder(tmp_path, params, gaussian_groups=variance)
    prior = load_prior(folder, backbone="unet", spatial_dims=3, paths=paths)
    assert prior.gaussian == variance
    kernels, _ = split_params(params, paths)
    guide = init_guide(jax.random.key(1), kernels, GuideConfig())
    key = jax.random.key(2)
    loc, log_var = _flat(guide.loc), _flat(guide.log_var)

    def closed_form(name):  # KL(N(μ, σ_q²) ‖ N(0, s²)) summed, in NumPy
        s2 = variance[name]
        total = 0.0
        for path in prior.groups[name]:
            m, v = np.asarray(loc[path], np.float64), np.exp(np.asarray(log_var[path], np.float64))
            total += np.sum(0.5 * np.log(s2 / v) + (v + m**2) / (2 * s2) - 0.5)
        return total

    expected = 0.0
    for group_key, name in zip(jax.random.split(key, 7), names, strict=True):
        if name in variance:
            expected += closed_form(name)
        else:
            rows = [
                jnp.concatenate([guide_rows(a[p]) for p in prior.groups[name]])
                for a in (loc, log_var)
            ]
            expected += float(group_kl_bound(*prior.vaes[name], *rows, group_key))
    assert float(prior.kl(guide, key)) == pytest.approx(expected, rel=1e-5)
    # DWP initialisation draws those groups' locations from the Gaussian.
    initial = _flat(init_locations_from_prior(jax.random.key(3), guide, prior).loc)
    drawn = np.concatenate([np.ravel(initial[p]) for p in prior.groups[names[3]]])
    assert np.std(drawn) == pytest.approx(0.5, rel=0.1)


def test_train_prior_falls_back_where_the_vae_loses():
    from experiments.train_prior import gaussian_fallbacks

    reports = {
        "big": {
            "heldout_neg_elbo": -20.0,
            "heldout_normal_neg_log_lik": -18.0,
            "normal_variance": 0.1,
        },
        "small": {
            "heldout_neg_elbo": -15.0,
            "heldout_normal_neg_log_lik": -16.5,
            "normal_variance": 0.2,
        },
    }
    assert gaussian_fallbacks(reports, {"big": [], "small": []}) == {"small": 0.2}
