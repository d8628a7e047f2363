import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vi_seg_jax.bayes.guide import GuideParams, sample_kernels
from vi_seg_jax.bayes.priors import NormalPrior


def _guide(key):
    k1, k2 = jax.random.split(key)
    return GuideParams(
        loc={"a": {"kernel": 0.7 * jax.random.normal(k1, (3, 3, 2, 2))}},
        log_var={"a": {"kernel": jax.random.uniform(k2, (3, 3, 2, 2), minval=-4.0, maxval=1.0)}},
    )


@pytest.mark.parametrize("prior_scale", [1.0, 0.3])
def test_closed_form_kl_matches_numpy_formula(prior_scale):
    guide = _guide(jax.random.key(0))
    mu = np.asarray(guide.loc["a"]["kernel"], np.float64)
    var = np.exp(np.asarray(guide.log_var["a"]["kernel"], np.float64))
    s2 = prior_scale**2
    expected = np.sum(0.5 * (np.log(s2 / var) + (var + mu**2) / s2 - 1.0))
    np.testing.assert_allclose(NormalPrior(prior_scale).kl(guide), expected, rtol=1e-5)


def test_closed_form_kl_matches_monte_carlo_log_ratio():
    guide = _guide(jax.random.key(1))
    prior = NormalPrior(1.0)
    mu, log_var = guide.loc["a"]["kernel"], guide.log_var["a"]["kernel"]

    def log_ratio(key):
        w = sample_kernels(key, guide)["a"]["kernel"]
        log_q = jax.scipy.stats.norm.logpdf(w, mu, jnp.exp(0.5 * log_var))
        log_p = jax.scipy.stats.norm.logpdf(w, 0.0, 1.0)
        return jnp.sum(log_q - log_p)

    samples = jax.vmap(log_ratio)(jax.random.split(jax.random.key(2), 20000))
    stderr = float(samples.std() / np.sqrt(samples.size))
    assert abs(float(samples.mean()) - float(prior.kl(guide))) < 4 * stderr


def test_kl_is_zero_when_q_equals_p():
    guide = GuideParams(loc={"k": jnp.zeros((3, 3, 1, 1))}, log_var={"k": jnp.zeros((3, 3, 1, 1))})
    assert float(NormalPrior(1.0).kl(guide)) == pytest.approx(0.0, abs=1e-6)
    assert float(NormalPrior(2.0).kl(guide)) > 0


def test_map_penalty_is_negative_log_density_up_to_a_constant():
    w = {"k": jnp.asarray([[0.5, -1.0], [2.0, 0.0]])}
    prior = NormalPrior(0.5)
    expected = -np.sum(jax.scipy.stats.norm.logpdf(np.asarray(w["k"]), 0.0, 0.5)) - 4 * np.log(
        0.5 * np.sqrt(2 * np.pi)
    )
    np.testing.assert_allclose(prior.neg_log_prob(w), expected, rtol=1e-6)
