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
from vi_seg_jax.dwp.vae import (
    ENCODER_CHANNELS,
    ENCODER_MODULES,
    VAEConfig,
    decode,
    encode,
    init_vae,
)
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
    n = 200
    estimates = np.asarray(
        jax.jit(jax.vmap(lambda k: group_kl_bound(params, config, loc, log_var, k)))(
            jax.random.split(jax.random.key(100), n)
        ),
        np.float64,
    )
    standard_error = estimates.std(ddof=1) / np.sqrt(n)
    assert estimates.mean() >= true_kl - 3 * standard_error
    # Both sides are Monte Carlo estimates: −H[q] + Σ_rows E[bound], the latter from the
    # 400 w draws per row above (pooled over rows: a conservative standard error).
    expected = neg_entropy + rows * bound.mean()
    expected_error = rows * bound.std(ddof=1) / np.sqrt(bound.size)
    assert abs(estimates.mean() - expected) < 4 * np.hypot(standard_error, expected_error)


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


# --- an affine Gaussian VAE, whose prior and bound have closed forms ---------------------
#
# With every ELU's input kept positive (large biases, cancelled further on), the encoder and
# decoder are affine: r(z|w) = N(Bw + d, e^λ I) and p(w|z) = N(Az + c, e^λ I), λ = −4 (the
# middle of the soft clamp's range, where it is the identity). Then the implicit prior is
# p(w) = N(c, AAᵀ + e^λ I), and the bound's expectation over q and r is a Gaussian integral.
# With A = a·Q (orthonormal Q, a² = 1 − e^λ) the exact posterior p(z|w) is
# N(aQᵀ(w − c), e^λ I): the encoder B = aQᵀ, d = −Bc is optimal and the bound is tight.

_AFFINE_LOG_VAR = -4.0
_OFFSET = 20.0


def _affine_vae(config, seed, *, optimal=True):
    """VAE params with the affine maps above, and the maps {A, c, B, d} (float64)."""
    dim, latent, hidden = config.kernel_dim, config.latent_dim, config.hidden
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(dim, latent)))
    a = np.sqrt(1.0 - np.exp(_AFFINE_LOG_VAR))
    maps = {"A": a * q, "c": 0.3 * rng.normal(size=dim), "B": a * q.T}
    if not optimal:
        maps["B"] = 0.5 * maps["B"] + 0.1 * rng.normal(size=(latent, dim))
    maps["d"] = -maps["B"] @ maps["c"] + (0.0 if optimal else 0.2 * rng.normal(size=latent))
    shapes = jax.eval_shape(lambda: init_vae(jax.random.key(0), config))
    p = jax.tree.map(lambda s: np.zeros(s.shape), shapes)
    # Encoder: channel 0 of the conv copies each pixel (+ offset); the dense layers apply B.
    p["enc_conv"]["kernel"][(1,) * config.spatial_dims + (0, 0)] = 1.0
    p["enc_conv"]["bias"][:] = _OFFSET
    p["enc_hidden"]["kernel"][0::ENCODER_CHANNELS, :latent] = maps["B"].T
    p["enc_hidden"]["bias"][:] = _OFFSET
    p["enc_hidden"]["bias"][:latent] -= _OFFSET * maps["B"].sum(1)
    p["enc_out"]["kernel"][:latent, :latent] = np.eye(latent)
    p["enc_out"]["bias"][:latent] = maps["d"] - _OFFSET
    p["enc_out"]["bias"][latent:] = _AFFINE_LOG_VAR
    # Decoder: z (+ offset) passes both hidden layers; the output layer applies A.
    p["dec_hidden1"]["kernel"][:, :latent] = np.eye(latent)
    p["dec_hidden1"]["bias"][:] = _OFFSET
    p["dec_hidden2"]["kernel"][:] = np.eye(hidden)
    p["dec_out"]["kernel"][:latent, :dim] = maps["A"].T
    p["dec_out"]["bias"][:dim] = maps["c"] - _OFFSET * maps["A"].sum(1)
    p["dec_out"]["bias"][dim:] = _AFFINE_LOG_VAR
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), p), maps


def _affine_expected_bound(maps, loc, log_var):
    """E_q[E_r[−log p(w|z)] + KL(r(z|w) ‖ N(0, I))] − H[q], summed over rows, in NumPy.

    w = μ + σ⊙η, z = Bw + d + s⊙ε: the residual w − Az − c is Gaussian with mean
    Mμ − Ad − c and per-entry variance Σ_j M_ij² σ_j² + Σ_k A_ik² s_k², with M = I − AB.
    """
    A, c, B, d = maps["A"], maps["c"], maps["B"], maps["d"]
    mu, var = np.asarray(loc, np.float64), np.exp(np.asarray(log_var, np.float64))
    v = s2 = np.exp(_AFFINE_LOG_VAR)
    m = np.eye(len(c)) - A @ B
    mean_x = mu @ m.T - A @ d - c
    var_x = var @ (m**2).T + s2 * np.sum(A**2, axis=1)
    neg_log_lik = 0.5 * np.sum(np.log(2 * np.pi * v) + (mean_x**2 + var_x) / v, axis=-1)
    mean_z = mu @ B.T + d
    kl = 0.5 * np.sum(mean_z**2 + var @ (B**2).T + s2 - 1.0 - np.log(s2), axis=-1)
    neg_entropy = -0.5 * np.sum(np.log(2 * np.pi * np.e * var))
    return neg_entropy + np.sum(neg_log_lik + kl)


def _affine_true_kl(maps, loc, log_var):
    """Σ_rows KL(N(μ, diag σ²) ‖ N(c, AAᵀ + e^λ I)), the exact KL to the implicit prior."""
    A, c = maps["A"], maps["c"]
    cov = A @ A.T + np.exp(_AFFINE_LOG_VAR) * np.eye(len(c))
    precision = np.linalg.inv(cov)
    mu, var = np.asarray(loc, np.float64), np.exp(np.asarray(log_var, np.float64))
    diff = mu - c
    per_row = (
        var @ np.diag(precision)
        + np.einsum("ri,ij,rj->r", diff, precision, diff)
        - len(c)
        + np.linalg.slogdet(cov)[1]
        - np.sum(np.log(var), axis=-1)
    )
    return 0.5 * np.sum(per_row)


def _slice_rows(leaf):
    """One row per (input, output) channel pair: the flattened k×k(×k) slice, in NumPy."""
    leaf = np.asarray(leaf, np.float64)
    c_in, c_out = leaf.shape[-2:]
    return np.stack([leaf[..., i, o].ravel() for i in range(c_in) for o in range(c_out)])


def _normal_kl(loc, log_var, variance=1.0):
    """Σ KL(N(μ, σ²) ‖ N(0, s²)) in NumPy."""
    m, v = np.asarray(loc, np.float64), np.exp(np.asarray(log_var, np.float64))
    return np.sum(0.5 * np.log(variance / v) + (v + m**2) / (2 * variance) - 0.5)


def _mc_kl(prior, guide, key, n):
    """n independent draws of the prior's KL bound, float64."""
    draws = jax.jit(jax.vmap(lambda k: prior.kl(guide, k)))(jax.random.split(key, n))
    return np.asarray(draws, np.float64)


def test_the_bound_has_its_closed_form_for_an_affine_gaussian_vae():
    config = VAEConfig(spatial_dims=2, latent_dim=2, hidden=8)
    rng = np.random.default_rng(5)
    rows = 32
    loc = jnp.asarray(0.3 * rng.normal(size=(rows, config.kernel_dim)), jnp.float32)
    log_var = jnp.asarray(rng.uniform(-6, -4, size=(rows, config.kernel_dim)), jnp.float32)
    # The construction is what it claims: affine maps, log-variance λ.
    params, maps = _affine_vae(config, 0, optimal=False)
    w = rng.normal(size=(5, config.kernel_dim))
    z = 2.0 * rng.normal(size=(5, config.latent_dim))
    (mu_z, lv_z), (mu_w, lv_w) = encode(params, config, w), decode(params, config, z)
    np.testing.assert_allclose(mu_z, w @ maps["B"].T + maps["d"], atol=1e-4)
    np.testing.assert_allclose(mu_w, z @ maps["A"].T + maps["c"], atol=1e-4)
    np.testing.assert_allclose(lv_z, np.full(lv_z.shape, _AFFINE_LOG_VAR), atol=1e-5)
    np.testing.assert_allclose(lv_w, np.full(lv_w.shape, _AFFINE_LOG_VAR), atol=1e-5)

    n = 2000
    estimate = jax.jit(
        jax.vmap(lambda p, k: group_kl_bound(p, config, loc, log_var, k), in_axes=(None, 0))
    )
    keys = jax.random.split(jax.random.key(3), n)
    # The optimal encoder: the bound's mean is the exact KL to N(c, AAᵀ + e^λ I).
    params, maps = _affine_vae(config, 0, optimal=True)
    true_kl = _affine_true_kl(maps, loc, log_var)
    assert _affine_expected_bound(maps, loc, log_var) == pytest.approx(true_kl, rel=1e-9)
    draws = np.asarray(estimate(params, keys), np.float64)
    standard_error = draws.std(ddof=1) / np.sqrt(n)
    assert abs(draws.mean() - true_kl) < 4 * standard_error
    # Another encoder: the bound's mean is its Gaussian integral, above the KL by the gap.
    params, maps = _affine_vae(config, 0, optimal=False)
    expected = _affine_expected_bound(maps, loc, log_var)
    draws = np.asarray(estimate(params, keys), np.float64)
    standard_error = draws.std(ddof=1) / np.sqrt(n)
    assert abs(draws.mean() - expected) < 4 * standard_error
    assert expected - true_kl > 10 * standard_error


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


def _prior_folder(
    tmp_path, params, backbone="unet", dims=3, latent=2, gaussian_groups=None, vaes=None
):
    groups = default_groups(backbone, bayesian_paths(params))
    config = VAEConfig(spatial_dims=dims, latent_dim=latent, hidden=8)
    if vaes is None:
        vaes = {
            name: (init_vae(jax.random.key(i), config), config) for i, name in enumerate(groups)
        }
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


def _affine_vaes(names, dims=3):
    """Group → (affine VAE params, config, maps); every other group's encoder is optimal."""
    config = VAEConfig(spatial_dims=dims, latent_dim=2, hidden=8)
    vaes = {}
    for i, name in enumerate(sorted(names)):
        params, maps = _affine_vae(config, i, optimal=i % 2 == 0)
        vaes[name] = (params, config, maps)
    return vaes


def _group_rows(tree, paths):
    return np.concatenate([_slice_rows(tree[p]) for p in paths])


def test_prior_folder_round_trip_and_the_kl_splits_by_coverage(tmp_path):
    _, params = _unet()
    paths = bayesian_paths(params)
    affine = _affine_vaes(default_groups("unet", paths))
    folder = _prior_folder(
        tmp_path, params, vaes={name: (p, config) for name, (p, config, _) in affine.items()}
    )
    prior = load_prior(folder, backbone="unet", spatial_dims=3, paths=paths)
    assert isinstance(prior, DeepWeightPrior) and len(prior.groups) == 7
    kernels, _ = split_params(params, paths)
    guide = init_guide(jax.random.key(1), kernels, GuideConfig(init_loc_std=0.1))
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
    # ... whose mean is, group by group, the closed form of the affine VAE read back from
    # the folder (one optimal encoder, one not); kernels of the groups left out get the
    # N(0, 1) KL (both in NumPy).
    kept = {name: prior.groups[name] for name in ("encoder_2", "up_1")}
    covered = {p for group in kept.values() for p in group}
    uncovered = [p for p in loc if p not in covered]
    expected = sum(_normal_kl(loc[p], log_var[p]) for p in uncovered)
    for name, group in kept.items():
        maps = affine[name][2]
        rows = [_group_rows(a, group) for a in (loc, log_var)]
        expected += _affine_expected_bound(maps, *rows)
    n = 64
    draws = _mc_kl(dataclasses.replace(prior, groups=kept), guide, jax.random.key(3), n)
    assert abs(draws.mean() - expected) < 4 * draws.std(ddof=1) / np.sqrt(n)
    # ... and without groups, the closed-form N(0, 1) KL.
    empty = dataclasses.replace(prior, groups={}, vaes={})
    everything = sum(_normal_kl(loc[p], log_var[p]) for p in loc)
    assert float(empty.kl(guide, key)) == pytest.approx(everything, rel=1e-5)


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
    affine = _affine_vaes(names)
    folder = _prior_folder(
        tmp_path,
        params,
        gaussian_groups=variance,
        vaes={name: (p, config) for name, (p, config, _) in affine.items()},
    )
    prior = load_prior(folder, backbone="unet", spatial_dims=3, paths=paths)
    assert prior.gaussian == variance
    kernels, _ = split_params(params, paths)
    guide = init_guide(jax.random.key(1), kernels, GuideConfig(init_loc_std=0.1))
    key = jax.random.key(2)
    loc, log_var = _flat(guide.loc), _flat(guide.log_var)

    def closed_form(name):  # KL(N(μ, σ_q²) ‖ N(0, s²)) summed, in NumPy
        return sum(_normal_kl(loc[p], log_var[p], variance[name]) for p in prior.groups[name])

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
    # In expectation, with the groups' Gaussians, one VAE group and N(0, 1) on the rest: all
    # three closed forms (NumPy), each group's for its own kernels.
    kept = {name: prior.groups[name] for name in (names[0], names[3], "up_3")}
    covered = {p for group in kept.values() for p in group}
    expected = closed_form(names[0]) + closed_form(names[3])
    expected += sum(_normal_kl(loc[p], log_var[p]) for p in loc if p not in covered)
    rows = [_group_rows(a, kept["up_3"]) for a in (loc, log_var)]
    expected += _affine_expected_bound(affine["up_3"][2], *rows)
    n = 64
    draws = _mc_kl(dataclasses.replace(prior, groups=kept), guide, jax.random.key(3), n)
    assert abs(draws.mean() - expected) < 4 * draws.std(ddof=1) / np.sqrt(n)
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
