"""Tests of vi_seg_jax.data.preprocess: exact geometry round trip and normalisation."""

import json

import numpy as np
import pytest

from vi_seg_jax.data.preprocess import (
    GridMapping,
    PreprocessConfig,
    bounding_box,
    brain_mask,
    padding_for,
    preprocess,
    to_original_grid,
    to_preprocessed_grid,
)


def make_case(rng, shape, channels=4, touch_border=False):
    """A random 'brain' (a box with a ragged edge) with intensities and a label inside it."""
    shape = tuple(shape)
    if touch_border:
        lo = [0] * len(shape)
        hi = list(shape)
    else:
        lo = [int(rng.integers(1, max(2, s // 3))) for s in shape]
        hi = [
            int(rng.integers(max(lo_ + 2, 2 * s // 3), s)) for lo_, s in zip(lo, shape, strict=True)
        ]
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = True
    mask &= rng.random(shape) < 0.9  # holes and a ragged edge
    image = np.zeros((*shape, channels), dtype=np.float32)
    # Channel 0 is non-zero on the whole mask; the others have some zeros inside it.
    image[..., 0][mask] = rng.uniform(1.0, 500.0, size=mask.sum())
    for c in range(1, channels):
        values = rng.normal(100.0 * c, 30.0, size=mask.sum()) * (rng.random(mask.sum()) < 0.8)
        image[..., c][mask] = values
    label = np.where(mask, rng.integers(0, 5, size=shape), 0).astype(np.uint8)
    return image, label, mask


def reference_zscore(image, mask):
    """Independent NumPy reference on the original grid."""
    out = np.zeros(image.shape, dtype=np.float64)
    for c in range(image.shape[-1]):
        values = image[..., c][mask].astype(np.float64)
        std = values.std()
        out[..., c][mask] = (values - values.mean()) / (std if std > 1e-8 else 1.0)
    return out


SHAPES = [(23, 31, 17), (40, 33, 29), (9, 11, 13), (64, 48, 35)]


@pytest.mark.parametrize("multiple", [8, 16])
@pytest.mark.parametrize("shape", SHAPES)
def test_label_round_trip_is_exact(shape, multiple):
    rng = np.random.default_rng(sum(shape) * multiple)
    image, label, _ = make_case(rng, shape)
    out = preprocess(image, label, PreprocessConfig(multiple=multiple))
    assert all(s % multiple == 0 for s in out.label.shape)
    assert out.label.shape == out.mapping.preprocessed_shape == out.image.shape[:3]
    assert out.label.dtype == np.uint8
    back = to_original_grid(out.label, out.mapping)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, label)


@pytest.mark.parametrize("shape", SHAPES)
def test_float_maps_round_trip(shape):
    rng = np.random.default_rng(len(shape) * sum(shape))
    image, label, mask = make_case(rng, shape, channels=2)
    out = preprocess(image, label, PreprocessConfig(multiple=16, margin=2))
    # A float map with trailing dims on the preprocessed grid maps back exactly.
    probs = rng.random((*out.mapping.preprocessed_shape, 3)).astype(np.float32)
    back = to_original_grid(probs, out.mapping, fill=-1.0)
    assert back.shape == (*shape, 3) and back.dtype == np.float32
    forward = to_preprocessed_grid(back, out.mapping, fill=7.0)
    pad = tuple(
        slice(b, b + n)
        for b, n in zip(out.mapping.pad_before, out.mapping.cropped_shape, strict=True)
    )
    np.testing.assert_array_equal(forward[pad], probs[pad])
    # The preprocessed image maps back onto the reference normalisation of the source.
    np.testing.assert_allclose(
        to_original_grid(out.image, out.mapping), reference_zscore(image, mask), atol=1e-5
    )
    np.testing.assert_array_equal(to_original_grid(out.mask, out.mapping), mask)
    # A map on the original grid inside the crop survives forward and back.
    original = rng.normal(size=(*shape, 2)) * mask[..., None]
    np.testing.assert_array_equal(
        to_original_grid(to_preprocessed_grid(original, out.mapping), out.mapping), original
    )


def test_zscore_statistics_inside_mask():
    rng = np.random.default_rng(0)
    image, _, _ = make_case(rng, (30, 28, 26), channels=4)
    out = preprocess(image, None, PreprocessConfig(normalization="zscore"))
    assert out.label is None
    assert out.image.dtype == np.float32
    inside = out.image[out.mask]
    np.testing.assert_allclose(inside.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(inside.std(axis=0), 1.0, atol=1e-5)
    assert np.all(out.image[~out.mask] == 0)


def test_minmax_in_unit_interval():
    rng = np.random.default_rng(1)
    image, _, _ = make_case(rng, (21, 25, 19), channels=3)
    out = preprocess(image, None, PreprocessConfig(normalization="minmax", multiple=4))
    inside = out.image[out.mask]
    assert inside.min() >= 0.0 and inside.max() <= 1.0
    np.testing.assert_allclose(inside.min(axis=0), 0.0, atol=1e-7)
    np.testing.assert_allclose(inside.max(axis=0), 1.0, atol=1e-6)
    assert np.all(out.image[~out.mask] == 0)


@pytest.mark.parametrize("normalization", ["zscore", "minmax"])
def test_constant_channel_is_guarded(normalization):
    rng = np.random.default_rng(2)
    image, _, mask = make_case(rng, (12, 14, 10), channels=2)
    image[..., 1] = np.where(mask, 5.0, 0.0)
    out = preprocess(image, None, PreprocessConfig(normalization=normalization))
    assert np.all(np.isfinite(out.image))
    assert np.all(out.image[..., 1] == 0)


def test_brain_touching_border():
    rng = np.random.default_rng(3)
    image, label, mask = make_case(rng, (17, 19, 15), touch_border=True)
    mask_full = brain_mask(image)
    np.testing.assert_array_equal(mask_full, mask)
    out = preprocess(image, label, PreprocessConfig(multiple=8, margin=5))
    start, stop = bounding_box(mask)
    assert out.mapping.crop_start == start and out.mapping.crop_stop == stop
    assert out.mapping.preprocessed_shape == (24, 24, 16)
    np.testing.assert_array_equal(to_original_grid(out.label, out.mapping), label)


def test_margin_widens_crop_and_is_clipped():
    mask = np.zeros((20, 20, 20), dtype=bool)
    mask[1:5, 8:12, 15:19] = True
    assert bounding_box(mask) == ((1, 8, 15), (5, 12, 19))
    assert bounding_box(mask, margin=3) == ((0, 5, 12), (8, 15, 20))


def test_padding_is_even_and_meets_min_shape():
    before, after = padding_for((13, 16, 7), 8)
    assert before == (1, 0, 0) and after == (2, 0, 1)
    before, after = padding_for((13, 16, 7), 8, min_shape=(32, 8, 20))
    assert tuple(b + a + s for b, a, s in zip(before, after, (13, 16, 7), strict=True)) == (
        32,
        16,
        24,
    )
    rng = np.random.default_rng(4)
    image, label, _ = make_case(rng, (19, 23, 21))
    out = preprocess(image, label, PreprocessConfig(multiple=16, min_shape=(40, 16, 16)))
    assert out.image.shape[:3][0] >= 40
    assert all(s % 16 == 0 for s in out.image.shape[:3])
    assert all(
        0 <= a - b <= 1 for b, a in zip(out.mapping.pad_before, out.mapping.pad_after, strict=True)
    )


def test_two_dimensional_image():
    rng = np.random.default_rng(5)
    image, label, _ = make_case(rng, (37, 29), channels=1)
    out = preprocess(image, label, PreprocessConfig(multiple=8))
    assert out.image.shape[:2] == out.mapping.preprocessed_shape
    assert all(s % 8 == 0 for s in out.image.shape[:2])
    np.testing.assert_array_equal(to_original_grid(out.label, out.mapping), label)


def test_all_zero_image_raises():
    with pytest.raises(ValueError, match="no non-zero voxel"):
        preprocess(np.zeros((8, 8, 8, 4), dtype=np.float32))


def test_bad_inputs_raise():
    rng = np.random.default_rng(6)
    image, label, mask = make_case(rng, (16, 16, 16))
    with pytest.raises(ValueError, match="label shape"):
        preprocess(image, label[:-1])
    outside = label.copy()
    outside[0, 0, 0] = 2  # outside the brain box (make_case leaves index 0 empty)
    with pytest.raises(ValueError, match="outside the brain bounding box"):
        preprocess(image, outside)
    with pytest.raises(ValueError, match="canonical classes"):
        preprocess(image, np.where(mask, 7, 0))
    nan_image = image.copy()
    nan_image[3, 3, 3, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        preprocess(nan_image)
    with pytest.raises(ValueError, match="normalization"):
        PreprocessConfig(normalization="robust")
    with pytest.raises(ValueError, match="multiple"):
        PreprocessConfig(multiple=0)
    out = preprocess(image, label)
    with pytest.raises(ValueError, match="preprocessed shape"):
        to_original_grid(out.label[:-1], out.mapping)
    with pytest.raises(ValueError, match="original shape"):
        to_preprocessed_grid(label[:-1], out.mapping)


def test_grid_mapping_json_round_trip():
    rng = np.random.default_rng(7)
    image, label, _ = make_case(rng, (25, 27, 23))
    mapping = preprocess(image, label, PreprocessConfig(multiple=16, margin=1)).mapping
    restored = GridMapping.from_dict(json.loads(json.dumps(mapping.to_dict())))
    assert restored == mapping
    assert isinstance(restored.crop_start, tuple)
    with pytest.raises(ValueError, match="lacks"):
        GridMapping.from_dict({"original_shape": [4, 4, 4]})
    with pytest.raises(ValueError, match="crop"):
        GridMapping((4, 4, 4), (0, 0, 3), (4, 4, 2), (0, 0, 0), (0, 0, 0))
