"""Fitting the kernel VAE: recovery of a known kernel distribution, the held-out ELBO
against the N(0, σ²) baseline, the β warm-up and early stopping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vi_seg_jax.bayes.elbo import linear_warmup
from vi_seg_jax.dwp import vae, vae_training

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
        params, report = vae_training.train_vae(
            kernels, RECOVERY_CONFIG, jax.random.key(1), progress=False
        )
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
    np.testing.assert_allclose(vae_training.normal_neg_log_lik(w, 0.7), expected)


def test_beta_warms_up_linearly():
    steps = jnp.asarray([0, 49, 99, 400], jnp.int32)
    np.testing.assert_allclose(linear_warmup(steps, 100), [0.01, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(linear_warmup(steps, 0), 1.0)


def test_early_stopping_validates_on_a_share_of_the_training_kernels():
    kernels = 0.05 * np.random.default_rng(3).normal(size=(200, 9)).astype(np.float32)
    base = {"spatial_dims": 2, "latent_dim": 2, "hidden": 8, "steps": 300}
    base |= {"beta_warmup_steps": 100}
    _, stopped = vae_training.train_vae(
        kernels, vae.VAEConfig(**base, validate_every=50), jax.random.key(0), progress=False
    )
    _, plain = vae_training.train_vae(
        kernels, vae.VAEConfig(**base, validate_every=0), jax.random.key(0), progress=False
    )
    assert (stopped["heldout_kernels"], stopped["validation_kernels"]) == (20, 18)
    assert stopped["train_kernels"] == 200 - 20 - 18
    # The kept parameters are those of a validation point after the warm-up.
    assert stopped["best_step"] in (100, 150, 200, 250, 300)
    assert np.isfinite(stopped["heldout_neg_elbo"])
    assert (plain["validation_kernels"], plain["best_step"]) == (0, 300)
    assert plain["train_kernels"] == 180
