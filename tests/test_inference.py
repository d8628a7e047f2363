"""Sliding-window inference against whole-volume evaluation and a NumPy reference."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vi_seg_jax.backbones import get_backbone
from vi_seg_jax.inference import (
    WindowConfig,
    gaussian_weights,
    sliding_window,
    volume_sample_fn,
    window_origins,
)
from vi_seg_jax.methods import MethodConfig
from vi_seg_jax.train.state import ModelSpec, create_train_state
from vi_seg_jax.uncertainty import posterior_predictive, sample_fn_for


@pytest.mark.parametrize(
    ("size", "window", "overlap"), [(20, 8, 0.25), (8, 8, 0.5), (17, 5, 0.0), (33, 16, 0.5)]
)
def test_window_origins_cover_the_axis_with_at_least_the_overlap(size, window, overlap):
    origins = window_origins((size,), (window,), overlap)[:, 0]
    assert origins[0] == 0 and origins[-1] == size - window
    covered = np.zeros(size, bool)
    for origin in origins:
        covered[origin : origin + window] = True
    assert covered.all()
    assert np.all(np.diff(origins) <= max(int(window * (1 - overlap)), 1))


def test_gaussian_weights_peak_in_the_centre_and_never_vanish():
    weights = gaussian_weights((9, 9, 9), 0.125)
    assert weights[4, 4, 4] == 1.0 and weights.min() >= 1e-3
    assert np.argmax(weights) == np.ravel_multi_index((4, 4, 4), weights.shape)


def _reference(tile_fn, volume, config):
    """The weighted average written out with NumPy loops."""
    spatial = volume.shape[:-1]
    origins = window_origins(spatial, config.window, config.overlap)
    weights = gaussian_weights(config.window, config.sigma_scale)[..., None]
    total = np.zeros((*spatial, 2))
    norm = np.zeros((*spatial, 1))
    for origin in origins:
        region = tuple(slice(o, o + w) for o, w in zip(origin, config.window, strict=True))
        out = np.asarray(tile_fn(jnp.asarray(volume[region])[None]))[0]
        total[region] += weights * out
        norm[region] += weights
    return total / norm


def _context_tile_fn(tiles):
    """Output depends on the whole tile (its mean) and the position: not pointwise."""
    mean = jnp.mean(tiles, axis=(1, 2, 3), keepdims=True)
    return jnp.concatenate(
        [tiles[..., :1] * mean[..., :1], jnp.tanh(tiles[..., 1:] + mean[..., 1:])], -1
    )


@pytest.mark.parametrize("tile_batch", [1, 3])
def test_sliding_window_matches_a_numpy_reference(tile_batch):
    volume = np.random.default_rng(0).normal(size=(13, 10, 9, 2)).astype(np.float32)
    config = WindowConfig(window=(6, 8, 4), overlap=0.4, tile_batch=tile_batch)
    out = sliding_window(_context_tile_fn, jnp.asarray(volume), config)
    np.testing.assert_allclose(
        out, _reference(_context_tile_fn, volume, config), rtol=1e-5, atol=1e-6
    )


def test_pointwise_functions_pass_through_unchanged():
    volume = np.random.default_rng(1).normal(size=(11, 7, 9, 2)).astype(np.float32)
    out = sliding_window(jnp.tanh, jnp.asarray(volume), WindowConfig(window=(4, 4, 4)))
    np.testing.assert_allclose(out, np.tanh(volume), rtol=1e-5, atol=1e-6)


def test_small_volumes_are_padded_up_to_the_window_and_cropped_back():
    volume = np.ones((3, 5, 2, 1), np.float32)
    out = sliding_window(lambda t: t * 2.0, jnp.asarray(volume), WindowConfig(window=(4, 4, 4)))
    assert out.shape == (3, 5, 2, 1)
    np.testing.assert_allclose(out, 2.0)


def test_bad_window_settings_are_refused():
    with pytest.raises(ValueError, match="overlap"):
        WindowConfig(overlap=1.0)
    with pytest.raises(ValueError, match="window"):
        sliding_window(jnp.tanh, jnp.zeros((4, 4, 4, 1)), WindowConfig(window=(4, 4)))


@pytest.fixture(scope="module")
def tiny_vi_model():
    net = get_backbone("unet", num_classes=2, spatial_dims=3, features=(4, 8))
    spec = ModelSpec(net, MethodConfig(method="vi", estimator="full"))
    state = create_train_state(jax.random.key(0), spec, jnp.zeros((1, 8, 8, 8, 4)))
    # Wider posterior than the initial one, so that samples visibly differ.
    guide = dataclasses.replace(
        state.guide, log_var=jax.tree.map(lambda v: v + 4.0, state.guide.log_var)
    )
    return spec, state.replace(guide=guide)


def test_volume_in_one_window_equals_the_whole_volume_output(tiny_vi_model):
    spec, state = tiny_vi_model
    volume = jax.random.normal(jax.random.key(1), (16, 16, 8, 4))
    sample_fn = sample_fn_for(spec, state)
    key = jax.random.key(2)
    tiled = posterior_predictive(
        volume_sample_fn(sample_fn, WindowConfig(window=(16, 16, 8))), volume, key, num_samples=3
    )
    whole = posterior_predictive(sample_fn, volume[None], key, num_samples=3)
    for a, b in zip(tiled, whole, strict=True):
        np.testing.assert_allclose(a, np.asarray(b)[0], rtol=1e-5, atol=1e-6)
    assert float(jnp.max(tiled.epistemic)) > 1e-6  # the samples differ


def test_every_tile_of_a_volume_sees_the_same_posterior_sample():
    def one_number_per_sample(index, key, images):
        # A "network" whose output is one random draw per (index, key).
        value = jax.random.uniform(key)
        return jnp.broadcast_to(value, (*images.shape[:-1], 1))

    config = WindowConfig(window=(4, 4, 4), overlap=0.5, tile_batch=2)
    sample = volume_sample_fn(one_number_per_sample, config)
    out = sample(jnp.asarray(0), jax.random.key(3), jnp.zeros((10, 9, 7, 1)))
    # Many tiles, one value: a weighted average of identical tiles.
    np.testing.assert_allclose(out, out[0, 0, 0, 0], rtol=1e-6)
    other = sample(jnp.asarray(1), jax.random.key(4), jnp.zeros((10, 9, 7, 1)))
    assert float(other[0, 0, 0, 0]) != float(out[0, 0, 0, 0])


def test_2d_backbones_slide_over_axial_slices():
    calls = []

    def slice_fn(index, key, images):
        calls.append(images.shape)
        return jnp.tanh(images)

    volume = jax.random.normal(jax.random.key(5), (6, 5, 4, 3))
    out = volume_sample_fn(slice_fn, WindowConfig(window=(6, 5, 1), tile_batch=2), 2)(
        jnp.asarray(0), jax.random.key(0), volume
    )
    assert (2, 6, 5, 3) in calls  # batches of 2D slices
    np.testing.assert_allclose(out, np.tanh(volume), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="2D backbone"):
        volume_sample_fn(slice_fn, WindowConfig(window=(6, 5, 2)), 2)
