import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from tests.bayes.tiny import TinyNet, tiny_batch
from vi_seg_jax.backbones.blocks import instance_norm
from vi_seg_jax.bayes.elbo import LikelihoodConfig, ObjectiveConfig, scaled_data_term
from vi_seg_jax.bayes.guide import (
    GuideConfig,
    bayesian_paths,
    init_guide,
    merge_params,
    sample_kernels,
    split_params,
)
from vi_seg_jax.bayes.layers import (
    _rows_of_draw,
    _three_fry,
    apply_backbone,
    apply_lrt,
    apply_sampled,
    standard_normal,
)
from vi_seg_jax.ops.partitioning import Rows

NUM_DRAWS = 3000


def _setup(log_var=-1.0):
    images, labels = tiny_batch()
    net = TinyNet()
    params = net.init(jax.random.key(0), images)["params"]
    kernels, rest = split_params(params, bayesian_paths(params))
    guide = init_guide(
        jax.random.key(3), kernels, GuideConfig(init_loc_std=0.5, init_log_var=log_var)
    )
    return net, rest, guide, images, labels


def test_zero_variance_lrt_is_the_mean_network():
    net, rest, guide, images, _ = _setup(log_var=-60.0)
    lrt, _ = apply_lrt(net, rest, guide, images, key=jax.random.key(0))
    mean, _ = apply_backbone(net, merge_params(rest, guide.loc), images, train=False)
    np.testing.assert_allclose(lrt, mean, atol=1e-4)


def test_lrt_and_full_sampling_give_the_same_pre_activation_moments():
    net, rest, guide, images, _ = _setup()
    keys = jax.random.split(jax.random.key(5), NUM_DRAWS)
    lrt = jax.vmap(lambda k: apply_lrt(net, rest, guide, images, key=k)[1]["hidden"])(keys)
    full = jax.lax.map(
        lambda k: apply_sampled(net, rest, sample_kernels(k, guide), images)[1]["hidden"],
        keys,
        batch_size=100,
    )
    # Exact moments of conv_1's output: mean conv(x, μ), variance conv(x², σ²).
    x = np.asarray(images, np.float64)
    mu = np.asarray(guide.loc["conv_1"]["kernel"], np.float64)
    var = np.exp(np.asarray(guide.log_var["conv_1"]["kernel"], np.float64))
    exact_mean = _numpy_conv_same(x, mu)
    exact_var = _numpy_conv_same(x**2, var)
    for draws in (lrt, full):
        stderr = np.sqrt(exact_var / NUM_DRAWS)
        assert np.all(np.abs(draws.mean(0) - exact_mean) < 5 * stderr + 1e-6)
        np.testing.assert_allclose(draws.var(0), exact_var, rtol=0.15, atol=1e-6)


def _numpy_conv_same(x, kernel):
    """Reference 'SAME' 3×3 convolution (cross-correlation, as in lax), NumPy loops."""
    batch, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((batch, h, w, kernel.shape[-1]))
    for i in range(3):
        for j in range(3):
            out += np.einsum("bhwc,cf->bhwf", padded[:, i : i + h, j : j + w], kernel[i, j])
    return out


def test_lrt_gradient_variance_is_lower_than_full_sampling():
    net, rest, guide, images, labels = _setup(log_var=-1.0)
    objective = ObjectiveConfig(LikelihoodConfig(ce_weight=1.0, dice_weight=0.0), num_data=1.0)

    def grad_of(estimator, key):
        def loss(loc):
            g = guide.replace(loc=loc)
            if estimator == "lrt":
                logits, _ = apply_lrt(net, rest, g, images, key=key)
            else:
                logits, _ = apply_sampled(net, rest, sample_kernels(key, g), images)
            return scaled_data_term(logits, labels, objective)

        return jax.grad(loss)(guide.loc)["conv_2"]["kernel"]

    keys = jax.random.split(jax.random.key(11), 400)
    variance = {
        e: float(jax.lax.map(lambda k, e=e: grad_of(e, k), keys, batch_size=50).var(0).sum())
        for e in ("lrt", "full")
    }
    assert variance["lrt"] < 0.8 * variance["full"], variance


def test_lrt_noise_depends_on_the_key_only():
    net, rest, guide, images, _ = _setup()
    a = apply_lrt(net, rest, guide, images, key=jax.random.key(1))[0]
    b = apply_lrt(net, rest, guide, images, key=jax.random.key(1))[0]
    c = apply_lrt(net, rest, guide, images, key=jax.random.key(2))[0]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert jnp.isfinite(a).all()


def test_standard_normal_is_standard_normal():
    """The LRT noise: a Kolmogorov–Smirnov test against N(0, 1), reproducible per seed."""
    seed = jax.random.bits(jax.random.key(3), (4,), jnp.uint32)
    draws = np.asarray(standard_normal(seed, (200, 500)))
    assert draws.shape == (200, 500) and draws.dtype == np.float32
    assert scipy.stats.kstest(draws.ravel(), "norm").pvalue > 1e-3
    np.testing.assert_array_equal(draws, standard_normal(seed, (200, 500)))
    other = jax.random.bits(jax.random.key(4), (4,), jnp.uint32)
    assert (
        abs(
            np.corrcoef(draws.ravel(), np.asarray(standard_normal(other, (200, 500))).ravel())[0, 1]
        )
        < 0.01
    )


def test_standard_normal_under_vmap_equals_one_seed_at_a_time():
    """A particle's noise does not depend on the particles drawn beside it."""
    seeds = jax.random.bits(jax.random.key(5), (3, 4), jnp.uint32)
    batched = jax.vmap(lambda s: standard_normal(s, (4, 6)))(seeds)
    for i in range(3):
        np.testing.assert_array_equal(batched[i], standard_normal(seeds[i], (4, 6)))


@pytest.mark.parametrize(
    "shape, start, count",
    [
        ((8, 3, 5, 2), 4, 4),  # even shares: whole pairs of rows
        ((8, 3, 5, 2), 2, 2),
        ((4, 7, 3), 1, 1),  # one row per device: half a pair, at either end
        ((4, 7, 3), 2, 1),
        ((6, 5, 3), 3, 3),  # odd shares of an even batch
        ((3, 4, 2), 1, 1),  # an odd batch, split along another axis by XLA
    ],
)
def test_rows_of_a_draw_are_the_rows_of_the_whole_draw(shape, start, count):
    """What a device draws for its rows over a mesh is that slice of one device's draw."""
    rows = Rows(jnp.asarray(start), count, shape[0])
    # The counter's low word about to wrap: the carry into the high word is exercised.
    for seed in ([1, 2, 3, 4], [7, 8, 0xFFFFFFFF - 20, 5]):
        seed = jnp.asarray(seed, jnp.uint32)
        whole = np.asarray(_three_fry(seed, shape))
        part = jax.jit(lambda seed, rows=rows: _rows_of_draw(seed, shape, rows))(seed)
        np.testing.assert_array_equal(part, whole[start : start + count])


def test_lrt_backward_pass_keeps_about_three_arrays_per_layer():
    # Per `norm → relu → Bayesian conv` layer the backward pass needs the normalised input,
    # the conv's input and d output / d variance. Left to XLA it kept eight.
    layers, size, channels = 6, 16, 8

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x, *, train=False):
            for i in range(layers):
                x = nn.relu(instance_norm(x))
                x = nn.Conv(channels, (3, 3, 3), use_bias=False, name=f"conv_{i}")(x)
            return x, {}

    net = Stack()
    images = jax.random.normal(jax.random.key(0), (1, size, size, size, channels))
    params = net.init(jax.random.key(1), images)["params"]
    kernels, rest = split_params(params, bayesian_paths(params))
    guide = init_guide(jax.random.key(2), kernels, GuideConfig())

    def loss(guide):
        out, _ = apply_lrt(net, rest, guide, images, key=jax.random.key(3))
        return jnp.sum(jnp.square(out))

    memory = jax.jit(jax.grad(loss)).lower(guide).compile().memory_analysis()
    assert memory.temp_size_in_bytes / (layers * images.nbytes) < 5.0
