"""Tests of vi_seg_jax.data.sampler: determinism, geometry and foreground oversampling."""

import jax
import numpy as np
import pytest

from vi_seg_jax.data.sampler import Batch, PatchSampler, extract_patch, patch_start


def make_volumes(seed=0, shapes=((20, 24, 16), (18, 16, 22), (12, 10, 8)), channels=2):
    """Random images; labels with a small tumour box in every case but the last."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i, shape in enumerate(shapes):
        images.append(rng.normal(size=(*shape, channels)).astype(np.float32))
        label = np.zeros(shape, dtype=np.uint8)
        if i < len(shapes) - 1:
            lo = [int(rng.integers(0, s - 4)) for s in shape]
            box = tuple(slice(a, a + 3 + i) for a in lo)
            label[box] = rng.integers(1, 4, size=label[box].shape)
        labels.append(label)
    return images, labels


def assert_batches_equal(a: Batch, b: Batch):
    for field, x, y in zip(Batch._fields, a, b, strict=True):
        np.testing.assert_array_equal(x, y, err_msg=field)


def test_same_key_same_batch_and_different_key_differs():
    images, labels = make_volumes()
    sampler = PatchSampler(
        images, labels, patch_shape=(8, 8, 8), batch_size=6, foreground_fraction=0.5
    )
    a = sampler.sample_batch(jax.random.key(0))
    assert_batches_equal(a, sampler.sample_batch(jax.random.key(0)))
    b = sampler.sample_batch(jax.random.key(1))
    assert not np.array_equal(a.images, b.images)
    # A second sampler over the same data draws the same batch: no hidden state.
    twin = PatchSampler(
        images, labels, patch_shape=(8, 8, 8), batch_size=6, foreground_fraction=0.5
    )
    assert_batches_equal(a, twin.sample_batch(jax.random.key(0)))


@pytest.mark.parametrize(
    "patch_shape, image_shape, label_shape",
    [((8, 6, 4), (5, 8, 6, 4, 2), (5, 8, 6, 4)), ((10, 12), (5, 10, 12, 2), (5, 10, 12))],
)
def test_shapes_and_dtypes(patch_shape, image_shape, label_shape):
    images, labels = make_volumes()
    sampler = PatchSampler(
        images, labels, patch_shape=patch_shape, batch_size=5, foreground_fraction=0.33
    )
    batch = sampler.sample_batch(jax.random.key(3))
    assert batch.images.shape == image_shape and batch.images.dtype == np.float32
    assert batch.labels.shape == label_shape and batch.labels.dtype == np.uint8
    assert batch.case_indices.shape == (5,)
    assert batch.centres.shape == batch.starts.shape == (5, 3)
    assert batch.forced_foreground.shape == (5,) and batch.forced_foreground.dtype == bool


def padded_slice(volume, start, extent):
    """Reference: the patch as a slice of the volume zero-padded by the extent on all sides."""
    pad = max(extent)
    padded = np.pad(volume, [(pad, pad)] * 3 + [(0, 0)] * (volume.ndim - 3))
    return padded[tuple(slice(s + pad, s + pad + e) for s, e in zip(start, extent, strict=True))]


@pytest.mark.parametrize("patch_shape", [(8, 8, 8), (16, 14, 12), (14, 14)])
def test_patch_content_matches_source(patch_shape):
    images, labels = make_volumes(seed=1)  # last case (12, 10, 8) is smaller than some patches
    sampler = PatchSampler(
        images, labels, patch_shape=patch_shape, batch_size=32, foreground_fraction=0.5
    )
    extent = (*patch_shape, 1) if len(patch_shape) == 2 else patch_shape
    for index in range(3):
        batch = sampler.batch_at(jax.random.key(7), index)
        for item in range(32):
            case, start = batch.case_indices[item], batch.starts[item]
            image = padded_slice(images[case], start, extent)
            label = padded_slice(labels[case], start, extent)
            if len(patch_shape) == 2:
                image, label = image[:, :, 0], label[:, :, 0]
            np.testing.assert_array_equal(batch.images[item], image)
            np.testing.assert_array_equal(batch.labels[item], label)
            # The drawn centre lies inside the patch, and the patch inside the volume
            # wherever the volume is large enough.
            centre, shape = batch.centres[item], labels[case].shape
            assert np.all(start <= centre) and np.all(centre < start + np.array(extent))
            fits = np.array(shape) >= np.array(extent)
            assert np.all((start >= 0)[fits])
            assert np.all((start + np.array(extent) <= np.array(shape))[fits])


def make_dense_volumes(seed=2):
    """Cases whose foreground covers about 30 %, 10 % and 0 % of the voxels."""
    images, labels = make_volumes(seed=seed)
    rng = np.random.default_rng(seed)
    labels = [
        (rng.random(label.shape) < density).astype(np.uint8) * 2
        for label, density in zip(labels, (0.3, 0.1, 0.0), strict=True)
    ]
    return images, labels


@pytest.mark.parametrize("p", [0.0, 0.33, 1.0])
def test_measured_foreground_fraction_matches_setting(p):
    images, labels = make_dense_volumes()
    batch_size, num_batches = 50, 48  # 2400 draws
    sampler = PatchSampler(
        images, labels, patch_shape=(6, 6, 6), batch_size=batch_size, foreground_fraction=p
    )
    centre_fg, forced, has_fg = [], [], []
    for batch in sampler.iterate_batches(jax.random.key(11), num_batches):
        for case, centre in zip(batch.case_indices, batch.centres, strict=True):
            centre_fg.append(labels[case][tuple(centre)] > 0)
        forced.append(batch.forced_foreground)
        has_fg.append(batch.labels.reshape(batch_size, -1).max(axis=1) > 0)
    n = batch_size * num_batches
    # q: fraction of foreground among uniform centres, from the volumes alone
    # (case uniform among all cases, voxel uniform in the case).
    q = np.mean([np.mean(label > 0) for label in labels])
    expected = p + (1 - p) * q
    tolerance = 4 * np.sqrt(expected * (1 - expected) / n) + 1e-9
    assert abs(np.mean(centre_fg) - expected) <= tolerance
    forced = np.concatenate(forced)
    assert abs(forced.mean() - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-9
    if p == 1.0:
        assert np.all(np.concatenate(has_fg))


def test_case_without_foreground_is_never_forced():
    images, labels = make_volumes(seed=3)
    empty = len(labels) - 1
    sampler = PatchSampler(
        images, labels, patch_shape=(6, 6, 6), batch_size=64, foreground_fraction=0.5
    )
    cases, forced = [], []
    for batch in sampler.iterate_batches(jax.random.key(5), 20):
        cases.append(batch.case_indices)
        forced.append(batch.forced_foreground)
    cases, forced = np.concatenate(cases), np.concatenate(forced)
    assert not np.any(cases[forced] == empty)
    assert np.any(cases[~forced] == empty)  # it is still drawn for random patches
    # Forced items choose uniformly among the cases that have foreground.
    counts = np.bincount(cases[forced], minlength=len(labels))[:empty]
    assert counts.min() > 0.3 * forced.sum() / empty


def test_iterate_batches_resumes_from_position():
    images, labels = make_volumes(seed=4)
    sampler = PatchSampler(images, labels, patch_shape=(6, 6), batch_size=3)
    key = jax.random.key(42)
    full = list(sampler.iterate_batches(key, 6))
    resumed = list(sampler.iterate_batches(key, 3, start=3))
    for a, b in zip(full[3:], resumed, strict=True):
        assert_batches_equal(a, b)
    assert_batches_equal(full[4], sampler.batch_at(key, 4))
    endless = sampler.iterate_batches(key)
    for expected in full:
        assert_batches_equal(next(endless), expected)
    assert not np.array_equal(full[0].images, full[1].images)


@pytest.mark.parametrize("patch_shape", [(6, 6, 6), (8, 8)])
def test_rows_are_the_same_rows_of_the_whole_batch(patch_shape):
    """Processes of a multi-process run each read their rows; together they are the batch."""
    images, labels = make_volumes(seed=6)
    sampler = PatchSampler(
        images, labels, patch_shape=patch_shape, batch_size=6, unbiased_weights=True
    )
    key = jax.random.key(3)
    whole = sampler.batch_at(key, 2)
    parts = [sampler.batch_at(key, 2, rows=slice(a, a + 2)) for a in (0, 2, 4)]
    for field, expected in zip(Batch._fields, whole, strict=True):
        joined = np.concatenate([getattr(part, field) for part in parts])
        np.testing.assert_array_equal(joined, expected, err_msg=field)


def test_key_types():
    images, labels = make_volumes()
    sampler = PatchSampler(images, labels, patch_shape=(4, 4, 4), batch_size=2)
    typed = jax.random.key(9)
    legacy = jax.random.key_data(typed)  # uint32[2], as jax.random.PRNGKey(9) gives
    assert_batches_equal(sampler.sample_batch(typed), sampler.sample_batch(legacy))
    with pytest.raises(TypeError, match="scalar key"):
        sampler.sample_batch(jax.random.split(typed, 2))
    with pytest.raises(TypeError, match=r"jax\.random\.key"):
        sampler.sample_batch(9)


def test_memmap_volumes_give_the_same_batches(tmp_path):
    images, labels = make_volumes(seed=5)
    mapped_images, mapped_labels = [], []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        np.save(tmp_path / f"image_{i}.npy", image)
        np.save(tmp_path / f"label_{i}.npy", label)
        mapped_images.append(np.load(tmp_path / f"image_{i}.npy", mmap_mode="r"))
        mapped_labels.append(np.load(tmp_path / f"label_{i}.npy", mmap_mode="r"))
    kwargs = dict(patch_shape=(8, 8, 8), batch_size=4, foreground_fraction=0.33)
    in_memory = PatchSampler(images, labels, **kwargs).sample_batch(jax.random.key(1))
    mapped = PatchSampler(mapped_images, mapped_labels, **kwargs).sample_batch(jax.random.key(1))
    assert_batches_equal(in_memory, mapped)
    assert type(mapped.images) is np.ndarray


def test_patch_helpers():
    assert patch_start((0, 9, 5), (4, 4, 4), (10, 10, 10)) == (0, 6, 3)
    assert patch_start((2, 2, 2), (8, 4, 7), (4, 10, 4)) == (-2, 0, -1)
    volume = np.arange(24).reshape(2, 3, 4)
    patch = extract_patch(volume, (-1, 1, 2), (3, 3, 3))
    assert patch.shape == (3, 3, 3)
    np.testing.assert_array_equal(patch[1:, :2, :2], volume[:, 1:, 2:])
    assert patch[0].sum() == 0 and patch[:, 2].sum() == 0 and patch[:, :, 2].sum() == 0
    assert not extract_patch(volume, (5, 0, 0), (2, 2, 2)).any()


def test_bad_settings_raise():
    images, labels = make_volumes()
    empty_labels = [np.zeros_like(label) for label in labels]
    with pytest.raises(ValueError, match="no case has foreground"):
        PatchSampler(images, empty_labels, patch_shape=(4, 4, 4), batch_size=2)
    PatchSampler(images, empty_labels, patch_shape=(4, 4, 4), batch_size=2, foreground_fraction=0)
    with pytest.raises(ValueError, match="patch_shape"):
        PatchSampler(images, labels, patch_shape=(4, 4, 4, 4), batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        PatchSampler(images, labels, patch_shape=(4, 4), batch_size=0)
    with pytest.raises(ValueError, match="foreground_fraction"):
        PatchSampler(images, labels, patch_shape=(4, 4), batch_size=2, foreground_fraction=1.5)
    with pytest.raises(ValueError, match="labels"):
        PatchSampler(images, labels[:-1], patch_shape=(4, 4), batch_size=2)
    with pytest.raises(ValueError, match="differ"):
        PatchSampler(images, [labels[1], labels[0], labels[2]], patch_shape=(4, 4), batch_size=2)
    with pytest.raises(ValueError, match="at least one"):
        PatchSampler([], [], patch_shape=(4, 4), batch_size=2)


@pytest.mark.parametrize("patch_shape", [(4, 4, 4), (5, 6)])
def test_unbiased_weights_make_the_batch_estimate_the_full_volume_sum(patch_shape):
    # One axis (3) is shorter than the patch, so zero padding is exercised too.
    shapes = ((9, 8, 7), (6, 10, 5), (3, 7, 6))
    images, labels = make_volumes(seed=1, shapes=shapes, channels=1)
    rng = np.random.default_rng(2)
    losses = [rng.random(shape) for shape in shapes]  # any per-voxel loss
    sampler = PatchSampler(
        images,
        labels,
        patch_shape=patch_shape,
        batch_size=64,
        foreground_fraction=0.5,
        unbiased_weights=True,
    )
    extent = (*patch_shape, 1) if len(patch_shape) == 2 else patch_shape
    num_data = sum(np.prod(s) for s in shapes) / np.prod(patch_shape)
    weighted, plain = [], []
    for index in range(60):
        batch = sampler.batch_at(jax.random.key(5), index)
        for case, start, weights in zip(
            batch.case_indices, batch.starts, batch.weights, strict=True
        ):
            loss = extract_patch(losses[case], start, extent).reshape(weights.shape)
            weighted.append(num_data * np.sum(weights * loss))
            plain.append(num_data * np.sum(loss))
    full = sum(loss.sum() for loss in losses)

    def standard_error(values):
        return np.std(values) / np.sqrt(len(values))

    assert abs(np.mean(weighted) - full) < 4 * standard_error(weighted)
    # Without the weights the oversampled tumour, the small case and the centre are counted
    # too often: the plain estimate is far off.
    assert abs(np.mean(plain) - full) > 8 * standard_error(plain)


def test_unbiased_weights_are_one_where_every_voxel_is_equally_likely():
    # A patch the size of the volume covers every voxel at every draw, and both cases have
    # foreground, so both are drawn equally often.
    images, labels = make_volumes(shapes=((7, 6, 5), (7, 6, 5)))
    labels[1] = labels[0]
    sampler = PatchSampler(
        images,
        labels,
        patch_shape=(7, 6, 5),
        batch_size=3,
        foreground_fraction=0.4,
        unbiased_weights=True,
    )
    batch = sampler.sample_batch(jax.random.key(0))
    np.testing.assert_allclose(batch.weights, 1.0, rtol=1e-6)
    assert batch.weights.dtype == np.float32
    plain = PatchSampler(images, labels, patch_shape=(7, 6, 5), batch_size=3)
    assert plain.sample_batch(jax.random.key(0)).weights is None


def test_case_weights_cover_every_voxel_and_agree_with_the_drawn_patches():
    shapes = ((9, 8, 7), (6, 10, 5), (7, 7, 6))
    images, labels = make_volumes(seed=3, shapes=shapes, channels=1)
    sampler = PatchSampler(
        images,
        labels,
        patch_shape=(4, 4, 4),
        batch_size=8,
        foreground_fraction=0.33,
        unbiased_weights=True,
    )
    maps = [sampler.case_weights(c) for c in range(len(shapes))]
    # Σ_v π(v) is the number of voxels one patch covers, and 1 / w = N·π, so the inverse
    # weights sum to N·P, the number of training voxels.
    total = sum(np.sum(1.0 / m.astype(np.float64)) for m in maps)
    assert total == pytest.approx(sum(np.prod(s) for s in shapes), rel=1e-5)
    # Tumour is oversampled, so it weighs less than background.
    assert maps[0][labels[0] > 0].mean() < 0.5 * maps[0][labels[0] == 0].mean()
    batch = sampler.sample_batch(jax.random.key(9))
    for case, start, weights in zip(batch.case_indices, batch.starts, batch.weights, strict=True):
        np.testing.assert_allclose(weights, extract_patch(maps[case], start, (4, 4, 4)))
