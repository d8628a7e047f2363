"""The deep weight prior's kernel VAE: recovery of a known kernel distribution, the held-out
ELBO against the N(0, σ²) baseline, the ELBO against NumPy, storage and shapes."""

import itertools
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vi_seg_jax.dwp import vae
from vi_seg_jax.errors import DataError

# Low-rank Gaussian 3×3 kernels: w = A z + b + NOISE·ε, z ∈ R², so the covariance is
# A Aᵀ + NOISE² I — a structure that N(0, σ²I) cannot express and a 2-latent VAE can.
NOISE = 0.05
NUM_KERNELS = 4000
RECOVERY_CONFIG = vae.VAEConfig(
    spatial_dims=2,
    latent_dim=2,
    hidden=32,
    learning_rate=3e-3,
    steps=2000,
    beta_warmup_steps=400,
    validate_every=0,  # capacity, not early stopping, is under test here
)


def _low_rank_problem(seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(0.0, 0.5, (9, 2))
    b = rng.normal(0.0, 0.3, 9)
    z = rng.normal(size=(NUM_KERNELS, 2))
    w = z @ a.T + b + NOISE * rng.normal(size=(NUM_KERNELS, 9))
    return w.astype(np.float32), b, a @ a.T + NOISE**2 * np.eye(9)


@pytest.fixture(scope="module")
def trained():
    kernels, mean, cov = _low_rank_problem()
    # The suite compiles without most XLA optimisations because compilation dominates its
    # tiny shapes; 2000 training steps are the exception (≈4× faster optimised).
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        params, report = vae.train_vae(kernels, RECOVERY_CONFIG, jax.random.key(1), progress=False)
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)
    return params, report, mean, cov


def _sample_errors(params, config, mean, cov, key):
    """(max |mean error| / scale, relative Frobenius error of the covariance)."""
    samples = np.asarray(vae.sample_kernels(params, config, key, 20_000), np.float64)
    scale = math.sqrt(np.mean(np.diag(cov)))
    mean_error = np.max(np.abs(samples.mean(axis=0) - mean)) / scale
    cov_error = np.linalg.norm(np.cov(samples.T) - cov) / np.linalg.norm(cov)
    return mean_error, cov_error


def test_recovers_a_known_kernel_distribution(trained):
    params, _, mean, cov = trained
    mean_error, cov_error = _sample_errors(params, RECOVERY_CONFIG, mean, cov, jax.random.key(2))
    assert mean_error < 0.1
    assert cov_error < 0.25
    # The same check fails for an untrained VAE, so passing it means something.
    untrained = vae.init_vae(jax.random.key(3), RECOVERY_CONFIG)
    mean_error, cov_error = _sample_errors(untrained, RECOVERY_CONFIG, mean, cov, jax.random.key(2))
    assert mean_error > 0.1 or cov_error > 0.25


def test_mean_only_samples_are_decoder_means(trained):
    params, _, _, _ = trained
    key = jax.random.key(4)
    means = vae.sample_kernels(params, RECOVERY_CONFIG, key, 5, mean_only=True)
    z = jax.random.normal(jax.random.split(key)[0], (5, 2), jnp.float32)
    np.testing.assert_allclose(means, vae.decode(params, RECOVERY_CONFIG, z)[0], rtol=1e-6)
    noisy = vae.sample_kernels(params, RECOVERY_CONFIG, key, 5)
    assert not np.allclose(noisy, means)


def test_heldout_elbo_beats_the_normal_baseline(trained):
    _, report, _, _ = trained
    assert report["train_kernels"] == NUM_KERNELS - 400
    assert report["heldout_kernels"] == 400
    assert all(math.isfinite(report[k]) for k in report)
    assert report["heldout_neg_elbo"] < report["heldout_normal_neg_log_lik"]
    # Held-out and training −ELBO agree: the VAE generalises rather than memorises.
    assert abs(report["heldout_neg_elbo"] - report["final_train_neg_elbo"]) < 1.0


def test_normal_baseline_matches_the_formula():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 9))
    expected = -np.sum(-0.5 * w**2 / 0.7 - 0.5 * np.log(2 * np.pi * 0.7), axis=1)
    np.testing.assert_allclose(vae.normal_neg_log_lik(w, 0.7), expected)


# --- the ELBO against NumPy ---------------------------------------------------------------


def _np_elu(x):
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0.0)))


def _np_soft_clamp(x, low, high):
    x = low + np.logaddexp(0.0, x - low)
    return high - np.logaddexp(0.0, high - x)


def _np_dense(p, x):
    return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def _np_encode(params, config, w):
    """Conv (SAME, cross-correlation as in lax.conv) → ELU → dense → ELU → dense."""
    n, k, d = w.shape[0], config.kernel_size, config.spatial_dims
    kernel = np.asarray(params["enc_conv"]["kernel"], np.float64)  # [3]*d + [1, C]
    size = kernel.shape[0]
    x = np.pad(w.reshape((n,) + (k,) * d), [(0, 0)] + [(size // 2, size // 2)] * d)
    out = np.zeros((n,) + (k,) * d + (kernel.shape[-1],))
    for offset in itertools.product(range(size), repeat=d):
        window = x[(slice(None), *(slice(o, o + k) for o in offset))]
        out += window[..., None] * kernel[offset][0]
    h = _np_elu(out + np.asarray(params["enc_conv"]["bias"], np.float64)).reshape(n, -1)
    h = _np_elu(_np_dense(params["enc_hidden"], h))
    mu, log_var = np.split(_np_dense(params["enc_out"], h), 2, axis=-1)
    return mu, _np_soft_clamp(log_var, vae.LOG_VAR_MIN, vae.LOG_VAR_MAX)


def _np_decode(params, z):
    h = _np_elu(_np_dense(params["dec_hidden1"], z))
    h = _np_elu(_np_dense(params["dec_hidden2"], h))
    mu, log_var = np.split(_np_dense(params["dec_out"], h), 2, axis=-1)
    return mu, _np_soft_clamp(log_var, vae.LOG_VAR_MIN, vae.LOG_VAR_MAX)


def _np_gaussian_nll(w, mu, log_var):
    return np.sum(0.5 * (np.log(2 * np.pi) + log_var + (w - mu) ** 2 / np.exp(log_var)), axis=1)


def _spread_params(config, key):
    # Init params scaled up, so that the log-variances spread well away from 0 (some into
    # the soft clamp) and the check is not of a near-identity network.
    params = vae.init_vae(key, config)
    return jax.tree_util.tree_map(lambda p: 4.0 * p, params)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_negative_elbo_matches_numpy(spatial_dims):
    config = vae.VAEConfig(spatial_dims=spatial_dims, latent_dim=3, hidden=16)
    params = _spread_params(config, jax.random.key(0))
    rng = np.random.default_rng(1)
    w = rng.normal(0.0, 0.3, (7, config.kernel_dim)).astype(np.float32)
    w64 = w.astype(np.float64)

    mu_z, log_var_z = _np_encode(params, config, w64)
    got_mu_z, got_log_var_z = vae.encode(params, config, w)
    np.testing.assert_allclose(got_mu_z, mu_z, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_log_var_z, log_var_z, rtol=1e-4, atol=1e-4)

    z = rng.normal(size=(7, 3))
    mu_w, log_var_w = _np_decode(params, z)
    assert log_var_w.max() - log_var_w.min() > 2.0  # the spread the check relies on
    got_mu_w, got_log_var_w = vae.decode(params, config, z.astype(np.float32))
    np.testing.assert_allclose(got_mu_w, mu_w, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_log_var_w, log_var_w, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        vae.decoder_neg_log_prob(params, config, w, z.astype(np.float32)),
        _np_gaussian_nll(w64, mu_w, log_var_w),
        rtol=1e-4,
    )

    # negative_elbo draws ε = jax.random.normal(key, μ_z.shape) (its documented sample).
    key = jax.random.key(5)
    eps = np.asarray(jax.random.normal(key, (7, 3), jnp.float32), np.float64)
    z = mu_z + np.exp(0.5 * log_var_z) * eps
    mu_w, log_var_w = _np_decode(params, z)
    nll = _np_gaussian_nll(w64, mu_w, log_var_w)
    kl = 0.5 * np.sum(mu_z**2 + np.exp(log_var_z) - 1.0 - log_var_z, axis=1)
    for beta in (1.0, 0.3):
        np.testing.assert_allclose(
            vae.negative_elbo(params, config, w, key, beta), nll + beta * kl, rtol=1e-4
        )


def test_soft_clamp_bounds_and_passes_through():
    x = jnp.asarray([-1e4, -30.0, -3.0, 0.0, 2.0, 30.0, 1e4], jnp.float32)
    y = np.asarray(vae.soft_clamp(x, -12.0, 4.0))
    assert np.all(y >= -12.0) and np.all(y <= 4.0)
    np.testing.assert_allclose(y[2:5], [-3.0, 0.0, 2.0], atol=0.15)
    grads = jax.vmap(jax.grad(lambda v: vae.soft_clamp(v, -12.0, 4.0)))(x[1:-1])
    assert np.all(np.asarray(grads) > 0.0)  # unlike clip, never stuck


def test_beta_warms_up_linearly():
    steps = jnp.asarray([0, 50, 100, 400], jnp.int32)
    np.testing.assert_allclose(vae.beta_at(steps, 100), [0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(vae.beta_at(steps, 0), 1.0)


# --- storage ------------------------------------------------------------------------------

SMALL_CONFIG = vae.VAEConfig(spatial_dims=2, latent_dim=2, hidden=8)


def _assert_same_vae(a, b, config):
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    w = np.random.default_rng(0).normal(size=(4, config.kernel_dim)).astype(np.float32)
    for x, y in zip(vae.encode(a, config, w), vae.encode(b, config, w), strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(
        vae.sample_kernels(a, config, jax.random.key(0), 4),
        vae.sample_kernels(b, config, jax.random.key(0), 4),
    )


def test_save_load_round_trip_and_overwrite(tmp_path):
    target = tmp_path / "vae"
    params = vae.init_vae(jax.random.key(0), SMALL_CONFIG)
    vae.save_vae(target, params, SMALL_CONFIG)
    loaded, config = vae.load_vae(target)
    assert config == SMALL_CONFIG
    _assert_same_vae(params, loaded, config)

    # Saving over an existing VAE replaces it whole and leaves no temporary directories.
    other = vae.init_vae(jax.random.key(1), SMALL_CONFIG)
    vae.save_vae(target, other, SMALL_CONFIG)
    _assert_same_vae(other, vae.load_vae(target)[0], SMALL_CONFIG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]
    assert not list(target.rglob("*.pkl")) and not list(target.rglob("*.pickle"))


def _no_config(d):
    (d / "config.json").unlink()


def _bad_json(d):
    (d / "config.json").write_text("{not json")


def _wrong_format(d):
    (d / "config.json").write_text(json.dumps({"format": "something else"}))


def _edit_config(**changes):
    def edit(d):
        document = json.loads((d / "config.json").read_text())
        document["config"].update(changes)
        (d / "config.json").write_text(json.dumps(document))

    return edit


def _no_params(d):
    shutil.rmtree(d / "params")


def _params_metadata_removed(d):
    (d / "params" / "_METADATA").unlink()


@pytest.mark.parametrize(
    ("corrupt", "path_suffix", "problem"),
    [
        (_no_config, "config.json", "config missing"),
        (_bad_json, "config.json", "unreadable"),
        (_wrong_format, "config.json", "not a kernel VAE"),
        (_edit_config(unknown_field=1), "config.json", "unknown_field"),
        (_edit_config(spatial_dims=4), "config.json", "spatial_dims"),
        (_no_params, "params", "parameters missing"),
        (_edit_config(latent_dim=3), "params", "do not match"),
        (_params_metadata_removed, "params", "unreadable"),
    ],
)
def test_load_malformed_raises_data_error(tmp_path, corrupt, path_suffix, problem):
    target = tmp_path / "vae"
    vae.save_vae(target, vae.init_vae(jax.random.key(0), SMALL_CONFIG), SMALL_CONFIG)
    corrupt(target)
    with pytest.raises(DataError, match=problem) as info:
        vae.load_vae(target)
    assert info.value.path == str(target / path_suffix)
    assert "\n" not in str(info.value)


def test_load_missing_directory_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="no kernel VAE") as info:
        vae.load_vae(tmp_path / "absent")
    assert info.value.path == str(tmp_path / "absent")


# --- configuration and shapes -------------------------------------------------------------


@pytest.mark.parametrize(
    ("kernel_size", "spatial_dims", "kernel_dim"), [(3, 2, 9), (3, 3, 27), (5, 2, 25)]
)
def test_kernel_dim(kernel_size, spatial_dims, kernel_dim):
    config = vae.VAEConfig(kernel_size=kernel_size, spatial_dims=spatial_dims)
    assert config.kernel_dim == kernel_dim


def test_defaults_and_invalid_configs():
    config = vae.VAEConfig()
    assert (config.kernel_dim, config.latent_dim) == (27, 6)
    for bad in ({"spatial_dims": 1}, {"holdout_fraction": 0.0}, {"latent_dim": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            vae.VAEConfig(**bad)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_shapes(spatial_dims):
    config = vae.VAEConfig(spatial_dims=spatial_dims, latent_dim=4, hidden=8)
    n, dim = 5, config.kernel_dim
    params = vae.init_vae(jax.random.key(0), config)
    w = jnp.zeros((n, dim), jnp.float32)
    mu_z, log_var_z = vae.encode(params, config, w)
    assert mu_z.shape == log_var_z.shape == (n, 4)
    mu_w, log_var_w = vae.decode(params, config, mu_z)
    assert mu_w.shape == log_var_w.shape == (n, dim)
    assert vae.negative_elbo(params, config, w, jax.random.key(1)).shape == (n,)
    assert vae.decoder_neg_log_prob(params, config, w, mu_z).shape == (n,)
    assert vae.sample_kernels(params, config, jax.random.key(2), 3).shape == (3, dim)
    assert vae.sample_kernels(params, config, jax.random.key(2), 3, mean_only=True).shape == (
        3,
        dim,
    )
    with pytest.raises(ValueError, match=f"\\[n, {dim}\\]"):
        vae.encode(params, config, jnp.zeros((n, dim + 1), jnp.float32))
    with pytest.raises(ValueError, match="latents"):
        vae.decode(params, config, jnp.zeros((n, 5), jnp.float32))


def test_early_stopping_validates_on_a_share_of_the_training_kernels():
    kernels = 0.05 * np.random.default_rng(3).normal(size=(200, 9)).astype(np.float32)
    base = {"spatial_dims": 2, "latent_dim": 2, "hidden": 8, "steps": 300}
    base |= {"beta_warmup_steps": 100}
    _, stopped = vae.train_vae(
        kernels, vae.VAEConfig(**base, validate_every=50), jax.random.key(0), progress=False
    )
    _, plain = vae.train_vae(
        kernels, vae.VAEConfig(**base, validate_every=0), jax.random.key(0), progress=False
    )
    assert (stopped["heldout_kernels"], stopped["validation_kernels"]) == (20, 18)
    assert stopped["train_kernels"] == 200 - 20 - 18
    # The kept parameters are those of a validation point after the warm-up.
    assert stopped["best_step"] in (100, 150, 200, 250, 300)
    assert np.isfinite(stopped["heldout_neg_elbo"])
    assert (plain["validation_kernels"], plain["best_step"]) == (0, 300)
    assert plain["train_kernels"] == 180
