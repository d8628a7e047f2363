"""Tests of vi_seg_jax.data.augment: identities, geometry against NumPy, labels, presets."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.ndimage import map_coordinates

from vi_seg_jax.data.augment import (
    AUGMENTATIONS,
    AugmentConfig,
    _sample_linear,
    _sample_nearest,
    augment_batch,
    get_augmentation,
)

# Spatial transforms only, all forced, with a zoom-out so that some voxels read outside.
SPATIAL = AugmentConfig(
    mirror_p=(0.5, 0.5, 0.5),
    rotation_p=1.0,
    scale_p=1.0,
    scale_range=(0.8, 0.9),
    elastic_p=1.0,
    elastic_amplitude=(1.0, 1.5),
    elastic_spacing=6,
)
# Every transform runs (angle 0, zoom 1) but none moves a voxel: the resampling path.
IDENTITY_GRID = AugmentConfig(
    rotation_p=1.0, rotation_degrees=((0.0, 0.0),) * 3, scale_p=1.0, scale_range=(1.0, 1.0)
)


@functools.partial(jax.jit, static_argnames="config")
def augment(key, images, labels, config, weights=None):
    return augment_batch(key, images, labels, config, weights)


def random_batch(shape, channels=2, seed=0, label_dtype=np.uint8):
    """Random images [B, *S, C], labels in {0, 1, 2, 4} and positive weights [B, *S]."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(*shape, channels)).astype(np.float32)
    labels = rng.choice(np.array([0, 1, 2, 4], label_dtype), size=shape)
    weights = rng.uniform(0.5, 2.0, size=shape).astype(np.float32)
    return images, labels, weights


def smooth_batch(batch, size, channels=2):
    """Smooth images (an off-centre Gaussian blob in channel 0) and thresholded labels."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), axis=-1)
    centre = np.array([0.4 * n for n in size]) + np.array([1.0, -0.5, 0.5][: len(size)])
    blob = np.exp(-np.sum((grid - centre) ** 2, axis=-1) / (2 * (0.22 * size[0]) ** 2))
    ramp = grid[..., 0] / size[0]
    image = np.stack([blob, ramp] + [blob * ramp] * (channels - 2), axis=-1)
    images = np.broadcast_to(image, (batch, *image.shape)).astype(np.float32)
    return images, threshold_labels(images[..., 0])


def threshold_labels(channel):
    """Classes {0, 1, 4} from intensity thresholds 0.3 and 0.6 (never 2 or 3)."""
    return np.where(channel > 0.6, 4, np.where(channel > 0.3, 1, 0)).astype(np.uint8)


@pytest.mark.parametrize("shape", [(2, 16, 16), (2, 12, 12, 12)], ids=["2d", "3d"])
@pytest.mark.parametrize("config", [AugmentConfig(), IDENTITY_GRID], ids=["nothing", "grid"])
def test_identity_returns_inputs_exactly(shape, config):
    images, labels, weights = random_batch(shape)
    out = augment(jax.random.key(0), images, labels, config, weights)
    for name, expected, actual in zip(
        ("images", "labels", "weights"), (images, labels, weights), out, strict=True
    ):
        assert actual.dtype == expected.dtype, name
        np.testing.assert_array_equal(actual, expected, err_msg=name)


def test_none_preset_returns_inputs_unchanged():
    images, labels, weights = random_batch((2, 8, 8))
    assert get_augmentation("none") is None
    out = augment_batch(jax.random.key(0), images, labels, get_augmentation("none"))
    assert len(out) == 2 and out[0] is images and out[1] is labels
    assert augment_batch(jax.random.key(0), images, labels, None, weights)[2] is weights


def test_same_key_same_batch_different_keys_and_items_differ():
    config = dataclasses.replace(get_augmentation("default"), noise_p=1.0)
    images, labels, _ = random_batch((1, 12, 12, 12))
    # Two identical items: each gets its own draw.
    images, labels = np.concatenate([images] * 2), np.concatenate([labels] * 2)
    a = augment(jax.random.key(7), images, labels, config)
    b = augment(jax.random.key(7), images, labels, config)
    c = augment(jax.random.key(8), images, labels, config)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[0][0], a[0][1])


@pytest.mark.parametrize("size", [(24, 24), (16, 16, 16)], ids=["2d", "3d"])
def test_labels_move_with_the_image(size):
    images, labels = smooth_batch(4, size)
    aug_images, aug_labels = augment(jax.random.key(3), images, labels, SPATIAL)
    aug_images, aug_labels = np.asarray(aug_images), np.asarray(aug_labels)
    # Nearest neighbour: only the original classes, never an interpolated 2 or 3.
    assert set(np.unique(aug_labels)) <= {0, 1, 4}
    # The transform did move things: the labels changed a lot.
    assert np.mean(aug_labels != labels) > 0.05
    # Away from the class boundaries, the label is the thresholded augmented image.
    channel = aug_images[..., 0]
    away = (np.abs(channel - 0.3) > 0.04) & (np.abs(channel - 0.6) > 0.04)
    assert away.mean() > 0.7
    agreement = np.mean(threshold_labels(channel)[away] == aug_labels[away])
    assert agreement > 0.97, agreement


@pytest.mark.parametrize("shape", [(2, 10, 12), (2, 10, 12, 8)], ids=["2d", "3d"])
@pytest.mark.parametrize("base", [AugmentConfig(), IDENTITY_GRID], ids=["flip", "grid"])
def test_mirroring_is_an_exact_flip(shape, base):
    images, labels, weights = random_batch(shape)
    config = dataclasses.replace(base, mirror_p=(0.0, 1.0, 0.0))
    out = augment(jax.random.key(1), images, labels, config, weights)
    for expected, actual in zip((images, labels, weights), out, strict=True):
        np.testing.assert_array_equal(actual, np.flip(expected, axis=2))


@pytest.mark.parametrize(
    "shape, about, axes",
    [
        ((2, 16, 16), 2, (1, 2)),  # in-plane: x towards y
        ((1, 12, 12, 12), 0, (2, 3)),  # about x: y towards z
        ((1, 12, 12, 12), 1, (3, 1)),  # about y: z towards x
        ((1, 12, 12, 12), 2, (1, 2)),  # about z: x towards y
    ],
    ids=["2d", "3d-x", "3d-y", "3d-z"],
)
def test_rotation_by_90_degrees_matches_rot90(shape, about, axes):
    images, labels, weights = random_batch(shape)
    degrees = [(0.0, 0.0)] * 3
    degrees[about] = (90.0, 90.0)
    config = AugmentConfig(rotation_p=1.0, rotation_degrees=tuple(degrees))
    out = augment(jax.random.key(2), images, labels, config, weights)
    interior = (slice(None),) + (slice(1, -1),) * (len(shape) - 1)
    np.testing.assert_allclose(
        out[0][interior], np.rot90(images, axes=axes)[interior], rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(out[1][interior], np.rot90(labels, axes=axes)[interior])
    np.testing.assert_array_equal(out[2][interior], np.rot90(weights, axes=axes)[interior])


def test_scale_and_shift_follow_the_formula_and_leave_labels():
    images, labels, weights = random_batch((2, 8, 8, 8), channels=3)
    config = AugmentConfig(
        intensity_scale_p=1.0,
        intensity_scale_range=(1.5, 1.5),
        intensity_shift_p=1.0,
        intensity_shift_range=(-0.25, -0.25),
    )
    out = augment(jax.random.key(4), images, labels, config, weights)
    np.testing.assert_allclose(out[0], 1.5 * images - 0.25, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out[1], labels)
    np.testing.assert_array_equal(out[2], weights)


def test_scale_and_shift_are_drawn_per_channel():
    images, labels, _ = random_batch((2, 8, 8, 8), channels=3)
    images = np.abs(images) + 1.0  # positive, so out / x recovers the factor
    config = AugmentConfig(intensity_scale_p=1.0, intensity_scale_range=(0.5, 2.0))
    out = np.asarray(augment(jax.random.key(5), images, labels, config)[0])
    factors = (out / images).reshape(2, -1, 3)
    np.testing.assert_allclose(factors, np.broadcast_to(factors[:, :1], factors.shape), rtol=1e-5)
    assert len(np.unique(np.round(factors[:, 0], 4))) == 6  # items and channels differ


def numpy_gamma(images, gamma):
    """Reference: per item and channel, min-max normalise over [min, max] ∪ {0}."""
    axes = tuple(range(1, images.ndim - 1))
    low = np.minimum(images.min(axis=axes, keepdims=True), 0.0)
    high = np.maximum(images.max(axis=axes, keepdims=True), 0.0)
    return ((images - low) / (high - low)) ** gamma * (high - low) + low


@pytest.mark.parametrize("positive", [False, True], ids=["zscore", "positive"])
def test_gamma_matches_numpy(positive):
    images, labels, weights = random_batch((2, 8, 8, 8))
    if positive:
        images = np.abs(images) + 0.5
    config = AugmentConfig(gamma_p=1.0, gamma_range=(1.4, 1.4))
    out = augment(jax.random.key(6), images, labels, config, weights)
    np.testing.assert_allclose(
        out[0], numpy_gamma(images.astype(np.float64), 1.4), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(out[1], labels)
    np.testing.assert_array_equal(out[2], weights)


def test_noise_has_the_drawn_std():
    images, labels, _ = random_batch((2, 12, 12, 12))
    config = AugmentConfig(noise_p=1.0, noise_std_range=(0.2, 0.2))
    out = augment(jax.random.key(9), images, labels, config)
    residual = np.asarray(out[0]) - images
    assert abs(residual.std() - 0.2) < 0.01 and abs(residual.mean()) < 0.01
    np.testing.assert_array_equal(out[1], labels)


@pytest.mark.parametrize("shape", [(2, 16, 16), (2, 12, 12, 12)], ids=["2d", "3d"])
@pytest.mark.parametrize("label_dtype", [np.uint8, np.int32])
def test_default_preset_jits_and_weights_move_like_labels(shape, label_dtype):
    images, labels, _ = random_batch(shape, label_dtype=label_dtype)
    # Weights that encode the label, so that both must come from the same voxel.
    weights = (10.0 * labels + 1.0).astype(np.float32)
    out = augment(jax.random.key(10), images, labels, get_augmentation("default"), weights)
    assert [(x.shape, x.dtype) for x in out] == [
        (images.shape, np.float32),
        (labels.shape, label_dtype),
        (weights.shape, np.float32),
    ]
    out = augment(jax.random.key(11), images, labels, SPATIAL, weights)
    aug_labels, aug_weights = np.asarray(out[1]), np.asarray(out[2])
    outside = aug_weights == 0
    assert outside.any(), "the zoom-out should read outside the patch"
    assert np.all(aug_labels[outside] == 0)
    np.testing.assert_array_equal(aug_weights[~outside], 10.0 * aug_labels[~outside] + 1.0)


def test_interpolation_matches_map_coordinates():
    rng = np.random.default_rng(12)
    shape = (7, 9, 8)
    image = rng.normal(size=(*shape, 3)).astype(np.float32)
    labels = rng.integers(0, 5, size=shape).astype(np.uint8)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    # Perturbed coordinates, some outside the volume, and some exact half-voxel ties.
    coords = (grid + rng.uniform(-2.0, 2.0, size=grid.shape)).astype(np.float32)
    coords[0, 0] = grid[0, 0] + 0.5
    linear = _sample_linear(jnp.asarray(image), jnp.asarray(coords))
    expected = np.stack(
        [map_coordinates(image[..., c], list(coords), order=1) for c in range(3)], axis=-1
    )
    np.testing.assert_allclose(linear, expected, rtol=1e-5, atol=1e-6)
    nearest = _sample_nearest(jnp.asarray(labels), jnp.asarray(coords))
    expected = map_coordinates(labels.astype(np.float32), list(coords), order=0)
    np.testing.assert_array_equal(nearest, expected.astype(np.uint8))


def test_presets():
    assert set(AUGMENTATIONS) == {"none", "light", "default"}
    light = get_augmentation("light")
    assert light.mirror_p == (0.5, 0.5, 0.5)
    assert light.intensity_scale_p > 0 and light.intensity_shift_p > 0
    assert not light.resamples and light.gamma_p == light.noise_p == 0
    default = get_augmentation("default")
    probabilities = [f.name for f in dataclasses.fields(AugmentConfig) if f.name.endswith("_p")]
    assert all(np.all(np.asarray(getattr(default, name)) > 0) for name in probabilities)
    assert default.elastic_p < default.rotation_p


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match=r"'bogus'.*default, light, none"):
        get_augmentation("bogus")


@pytest.mark.parametrize(
    "field, value",
    [
        ("mirror_p", (0.5, 0.5)),
        ("mirror_p", (0.5, 1.5, 0.0)),
        ("rotation_p", -0.1),
        ("noise_p", float("nan")),
        ("gamma_p", True),
        ("rotation_degrees", ((-30.0, 30.0),) * 2),
        ("rotation_degrees", ((30.0, -30.0),) * 3),
        ("scale_range", (0.0, 1.2)),
        ("scale_range", (1.4, 0.7)),
        ("gamma_range", (-1.0, 1.0)),
        ("noise_std_range", (-0.1, 0.1)),
        ("elastic_amplitude", (-1.0, 1.0)),
        ("intensity_shift_range", (0.1,)),
        ("elastic_spacing", 0),
        ("elastic_spacing", 2.5),
    ],
)
def test_bad_config_fields_raise(field, value):
    with pytest.raises(ValueError, match=rf"AugmentConfig\.{field}"):
        AugmentConfig(**{field: value})


def test_lists_are_stored_as_hashable_tuples():
    config = AugmentConfig(mirror_p=[1, 0, 0], rotation_degrees=[[0, 0]] * 3)
    assert config.mirror_p == (1.0, 0.0, 0.0) and hash(config) is not None


def test_bad_batches_raise():
    images, labels, weights = random_batch((2, 8, 8))
    key, config = jax.random.key(0), get_augmentation("light")
    with pytest.raises(ValueError, match="integer classes"):
        augment_batch(key, images, labels.astype(np.float32), config)
    with pytest.raises(ValueError, match="labels must be"):
        augment_batch(key, images, labels[:, :4], config)
    with pytest.raises(ValueError, match="weights must be"):
        augment_batch(key, images, labels, config, weights[:1])
    with pytest.raises(ValueError, match="2 or 3 spatial dims"):
        augment_batch(key, images[..., 0], labels[..., 0], config)
