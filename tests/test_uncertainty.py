import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vi_seg_jax.uncertainty import posterior_predictive


def _sample_fn(task, num_classes=2):
    """A fake posterior: sample t's probabilities are a fixed random function of its key."""

    def sample(index, key, images):
        logits = jax.random.normal(key, (*images.shape[:-1], num_classes)) * 2.0 + images
        return jax.nn.softmax(logits, -1) if task == "wt" else jax.nn.sigmoid(logits)

    return sample


@pytest.mark.parametrize("chunk_size", [1, 3, 8])
def test_chunks_equal_a_python_loop_over_samples(chunk_size):
    images = jax.random.normal(jax.random.key(0), (1, 4, 4, 1))
    key = jax.random.key(1)
    sample = _sample_fn("wt")
    out = posterior_predictive(sample, images, key, num_samples=7, chunk_size=chunk_size)
    probs = np.stack([np.asarray(sample(t, jax.random.fold_in(key, t), images)) for t in range(7)])
    mean = probs.mean(0)
    np.testing.assert_allclose(out.mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.epistemic, ((probs - mean) ** 2).mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out.aleatoric, (probs * (1 - probs)).mean(0), rtol=1e-5, atol=1e-6)
    entropy = lambda p: -(p * np.log(p + 1e-12)).sum(-1)  # noqa: E731
    np.testing.assert_allclose(out.entropy, entropy(mean), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out.expected_entropy, entropy(probs).mean(0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("task", ["wt", "regions"])
def test_variance_split_sums_to_the_bernoulli_variance_and_entropy_bounds(task):
    images = jax.random.normal(jax.random.key(2), (2, 5, 5, 1))
    out = posterior_predictive(
        _sample_fn(task, 2 if task == "wt" else 3),
        images,
        jax.random.key(3),
        num_samples=16,
        chunk_size=4,
        task=task,
    )
    np.testing.assert_allclose(out.aleatoric + out.epistemic, out.mean * (1 - out.mean), atol=1e-6)
    assert float(jnp.min(out.mutual_information)) >= 0.0
    k = out.mean.shape[-1]
    bound = np.log(2) if task == "wt" else k * np.log(2)
    assert float(jnp.max(out.entropy)) <= bound + 1e-6
    np.testing.assert_allclose(
        out.expected_entropy + out.mutual_information, out.entropy, atol=1e-5
    )


def test_identical_samples_have_no_epistemic_uncertainty():
    images = jnp.ones((1, 3, 3, 1))
    constant = lambda index, key, x: jax.nn.softmax(jnp.concatenate([x, -x], -1), -1)  # noqa: E731
    out = posterior_predictive(constant, images, jax.random.key(0), num_samples=5)
    np.testing.assert_allclose(out.epistemic, 0.0, atol=1e-7)
    np.testing.assert_allclose(out.mutual_information, 0.0, atol=1e-6)
