"""The deep weight prior's kernel VAE: the ELBO against NumPy, the soft clamp, the
configuration and shapes."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vi_seg_jax.dwp import vae

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
