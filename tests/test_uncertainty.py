"""The posterior predictive against a float64 brute force over stored samples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.bayes.tiny import TinyNet, tiny_batch
from vi_seg_jax.bayes.elbo import probabilities
from vi_seg_jax.bayes.layers import apply_backbone
from vi_seg_jax.methods import MethodConfig
from vi_seg_jax.train.state import ModelSpec, create_train_state
from vi_seg_jax.uncertainty import (
    Predictive,
    TTAPredictive,
    _psum_devices,
    add_samples,
    empty_sums,
    mirror_flips,
    num_chunks,
    posterior_predictive,
    sample_fn_for,
    sum_devices,
    summarize,
)


def _stored(logits, task):
    """Float32 probabilities [T, B, *S, K] of the given logits, and a sample_fn that
    returns sample t's stored probabilities (whatever key it gets)."""
    logits = jnp.asarray(logits, jnp.float32)
    probs = probabilities(logits, task)

    def sample(index, key, images):
        return probs[index]

    return np.asarray(probs), sample


def _random_logits(seed, shape, scale=2.0):
    return np.random.default_rng(seed).normal(size=shape) * scale


def _reference(probs, task):
    """The decompositions in float64 straight from their definitions (method.md §6)."""
    p = np.asarray(probs, np.float64)
    mean = p.mean(0)

    def plogp(x):
        return x * np.log(np.where(x > 0, x, 1.0))

    def entropy(q):
        if task == "wt":
            return -plogp(q).sum(-1)
        return -(plogp(q) + plogp(1.0 - q)).sum(-1)

    total = entropy(mean)
    expected = entropy(p).mean(0)
    return {
        "mean": mean,
        "aleatoric": (p * (1.0 - p)).mean(0),
        "epistemic": ((p - mean) ** 2).mean(0),
        "entropy": total,
        "expected_entropy": expected,
        "mutual_information": total - expected,
    }


def _images(probs):
    """Inputs shaped like the samples (the stored sample_fn ignores their values)."""
    return jnp.zeros((*probs.shape[1:-1], 1), jnp.float32)


@pytest.mark.parametrize("task", ["wt", "regions"])
@pytest.mark.parametrize("chunk_size", [1, 3, 8])
def test_decompositions_equal_a_float64_brute_force(task, chunk_size):
    k = 2 if task == "wt" else 3
    probs, sample = _stored(_random_logits(0, (7, 2, 5, 5, k)), task)
    out = posterior_predictive(
        sample, _images(probs), jax.random.key(1), num_samples=7, chunk_size=chunk_size, task=task
    )
    want = _reference(probs, task)
    for name, value in want.items():
        atol = 1e-9 if name in ("aleatoric", "epistemic") else 1e-6  # variances: ≤ 1/4
        np.testing.assert_allclose(getattr(out, name), value, rtol=1e-5, atol=atol, err_msg=name)
    assert np.min(want["mutual_information"]) > -1e-12  # the reference is a valid split
    assert np.max(want["epistemic"]) > 1e-2  # samples that really differ
    # The documented identity now holds up to rounding, not by construction.
    np.testing.assert_allclose(out.aleatoric + out.epistemic, out.mean * (1 - out.mean), atol=1e-6)


def _naive_float32_variance(probs):
    """The former formula: E[p²] − p̄² from float32 sums, clamped at 0."""
    p = np.asarray(probs, np.float32)
    count = np.float32(len(p))
    mean = np.sum(p, axis=0, dtype=np.float32) / count
    second = np.sum(p * p, axis=0, dtype=np.float32) / count
    return np.maximum(second - mean * mean, np.float32(0.0))


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_epistemic_variance_is_accurate_where_probabilities_saturate(chunk_size):
    # T = 20 (a partial last chunk at 3), region 0 at logit 7 ± 0.05 (p ≈ 1), region 1 at
    # −7 ± 0.05 (p ≈ 0): the true variance is ~2e-9 in both (p̂(1 − p̂) · 0.05)².
    rng = np.random.default_rng(3)
    logits = np.stack(
        [7.0 + 0.05 * rng.normal(size=(20, 1, 4, 4)), -7.0 + 0.05 * rng.normal(size=(20, 1, 4, 4))],
        axis=-1,
    )
    probs, sample = _stored(logits, "regions")
    out = posterior_predictive(
        sample,
        _images(probs),
        jax.random.key(0),
        num_samples=20,
        chunk_size=chunk_size,
        task="regions",
    )
    want = _reference(probs, "regions")
    variance = want["epistemic"]
    assert 3e-10 < np.min(variance) and np.max(variance) < 1e-8

    def relative_error(epistemic):
        return np.abs(np.asarray(epistemic, np.float64) - variance) / variance

    # The failure mode is real: at p ≈ 1, E[p²] − p̄² in float32 is rounding noise.
    # (Clamped to 0 in some voxels, tens of times the variance in others.)
    naive = relative_error(_naive_float32_variance(probs))[..., 0]
    assert np.min(naive) > 0.5 and np.max(naive) > 10.0, naive
    new = relative_error(out.epistemic)
    assert np.max(new) < 1e-2, np.max(new)
    np.testing.assert_allclose(out.aleatoric, want["aleatoric"], rtol=1e-5)
    np.testing.assert_allclose(out.mean, want["mean"], rtol=1e-6)
    # MI = H[p̄] − mean H[p̂] keeps its difference form: near p̄ = 1 its error is a few
    # 1e-7 nats (the rounding of p̄ times |log odds|), a sizeable part of an MI of ~2e-6
    # nats here, but negligible on the [0, log K] scale it is read on.
    np.testing.assert_allclose(out.mutual_information, want["mutual_information"], atol=2e-6)


def _device_states(sample, images, key, devices, *, chunk_size, num_samples, task):
    """Per-device states stacked [D, ...]: device d adds chunks d, d + D, ..."""
    sizes = dict(chunk_size=chunk_size, num_samples=num_samples, task=task)
    add = jax.jit(lambda sums, chunk: add_samples(sums, sample, images, key, chunk, **sizes))
    states = []
    for device in range(devices):
        sums = empty_sums(sample, images, key)
        for step in range(num_chunks(num_samples, chunk_size * devices)):
            sums = add(sums, jnp.asarray(step * devices + device))
        states.append(sums)
    return jax.tree_util.tree_map(lambda *x: jnp.stack(x), *states)


@pytest.mark.parametrize(
    ("devices", "chunk_size", "num_samples", "counts"),
    # A partial last chunk; two devices that get no samples at all.
    [(3, 2, 11, [4, 4, 3]), (4, 3, 5, [3, 2, 0, 0])],
)
def test_device_states_merge_to_the_single_device_result(devices, chunk_size, num_samples, counts):
    rng = np.random.default_rng(4)
    logits = np.concatenate(
        [
            7.0 + 0.05 * rng.normal(size=(num_samples, 1, 3, 3, 1)),
            rng.normal(size=(num_samples, 1, 3, 3, 2)),
        ],
        axis=-1,
    )
    probs, sample = _stored(logits, "regions")
    images, key = _images(probs), jax.random.key(0)
    sizes = dict(chunk_size=chunk_size, num_samples=num_samples, task="regions")
    stacked = _device_states(sample, images, key, devices, **sizes)
    np.testing.assert_array_equal(stacked.count, counts)

    merged = summarize(sum_devices(stacked), "regions")
    single = posterior_predictive(sample, images, key, **sizes)
    want = _reference(probs, "regions")
    for name, value in want.items():
        np.testing.assert_allclose(getattr(merged, name), value, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(getattr(merged, name), getattr(single, name), atol=1e-6)
    # Also where the variance is tiny (p ≈ 1): the merge keeps its relative accuracy.
    np.testing.assert_allclose(merged.epistemic[..., 0], want["epistemic"][..., 0], rtol=1e-2)

    # The psum path of `posterior_predictive` over a mesh (simulated with a named vmap).
    psummed = jax.vmap(lambda sums: _psum_devices(sums, "data"), axis_name="data")(stacked)
    for device in range(devices):
        own = jax.tree_util.tree_map(lambda x, d=device: x[d], psummed)
        for a, b in zip(summarize(own, "regions"), merged, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12)


def test_an_empty_chunk_changes_nothing_and_makes_no_nan():
    probs, sample = _stored(_random_logits(5, (4, 1, 3, 3, 2)), "wt")
    images, key = _images(probs), jax.random.key(0)
    sizes = dict(chunk_size=3, num_samples=4, task="wt")
    empty = add_samples(empty_sums(sample, images, key), sample, images, key, 5, **sizes)
    assert float(empty.count) == 0.0
    for field in summarize(empty, "wt"):
        assert np.all(np.isfinite(field))
    full = add_samples(empty, sample, images, key, 0, **sizes)
    full = add_samples(full, sample, images, key, 1, **sizes)  # the last, partial chunk
    after = add_samples(full, sample, images, key, 2, **sizes)
    for a, b in zip(full, after, strict=True):
        np.testing.assert_array_equal(a, b)
    want = _reference(probs, "wt")
    np.testing.assert_allclose(summarize(after, "wt").epistemic, want["epistemic"], rtol=1e-5)


def test_identical_samples_have_no_epistemic_uncertainty():
    images = jnp.ones((1, 3, 3, 1))
    constant = lambda index, key, x: jax.nn.softmax(jnp.concatenate([x, -x], -1), -1)  # noqa: E731
    out = posterior_predictive(constant, images, jax.random.key(0), num_samples=5)
    np.testing.assert_allclose(out.epistemic, 0.0, atol=1e-7)
    np.testing.assert_allclose(out.mutual_information, 0.0, atol=1e-6)


def test_mc_dropout_samples_differ_at_prediction():
    spec = ModelSpec(TinyNet(dropout_rate=0.5), MethodConfig(method="mc_dropout"))
    images, _ = tiny_batch()
    state = create_train_state(jax.random.key(0), spec, images)
    sample = sample_fn_for(spec, state)
    key = jax.random.key(1)
    first = sample(jnp.asarray(0), jax.random.fold_in(key, 0), images)
    second = sample(jnp.asarray(1), jax.random.fold_in(key, 1), images)
    assert float(jnp.max(jnp.abs(first - second))) > 1e-3  # another dropout mask
    again = sample(jnp.asarray(0), jax.random.fold_in(key, 0), images)
    np.testing.assert_array_equal(first, again)  # the key fixes the mask
    out = posterior_predictive(sample, images, key, num_samples=4, chunk_size=2)
    assert float(jnp.max(out.epistemic)) > 1e-4


def test_every_ensemble_member_is_one_sample():
    members = 3
    net = TinyNet()
    spec = ModelSpec(net, MethodConfig(method="ensemble", ensemble_size=members))
    images, _ = tiny_batch()
    state = create_train_state(jax.random.key(0), spec, images)
    key = jax.random.key(1)

    def member_probs(params):
        """Each member applied on its own, one by one: [M, B, *S, K]."""
        return np.stack(
            [
                np.asarray(
                    probabilities(
                        apply_backbone(
                            net,
                            jax.tree.map(lambda leaf, m=m: leaf[m], params),
                            images,
                            train=False,
                        )[0],
                        "wt",
                    )
                )
                for m in range(members)
            ]
        )

    def predictive(state, chunk_size):
        return posterior_predictive(
            sample_fn_for(spec, state), images, key, num_samples=members, chunk_size=chunk_size
        )

    each = member_probs(state.params)
    sample = sample_fn_for(spec, state)
    for m in range(members):  # sample t is member t
        np.testing.assert_allclose(
            sample(jnp.asarray(m), key, images), each[m], rtol=1e-5, atol=1e-7
        )
    want = _reference(each, "wt")
    for chunk_size in (1, members):
        out = predictive(state, chunk_size)
        np.testing.assert_allclose(out.mean, want["mean"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(out.epistemic, want["epistemic"], rtol=1e-4, atol=1e-9)
    assert np.max(want["epistemic"]) > 1e-4  # the members differ

    # Changing the last member alone changes the predictive, as the member-wise mean says.
    params = jax.tree.map(lambda leaf: leaf.at[members - 1].multiply(-1.0), state.params)
    changed = state.replace(params=params)
    moved = member_probs(params)
    np.testing.assert_array_equal(moved[: members - 1], each[: members - 1])
    out = predictive(changed, members)
    np.testing.assert_allclose(out.mean, moved.mean(0), rtol=1e-5, atol=1e-7)
    assert float(np.max(np.abs(np.asarray(out.mean) - want["mean"]))) > 1e-3


# --------------------------------------------------------------------- test-time flips


def _flip_sample_fn(seed, shape, task, *, equivariant):
    """Sample t: probabilities of `a_t · x + b_t` (pointwise: flip-equivariant) or of
    `a_t · x + L_t` with a random logit field L_t (not: a flip moves L_t against x)."""
    rng = np.random.default_rng(seed)
    num_samples, k = shape[0], shape[-1]
    scale = jnp.asarray(rng.normal(size=(num_samples, 1, 1, 1, k)), jnp.float32)
    field = rng.normal(size=(num_samples, k)) if equivariant else rng.normal(size=shape)
    field = jnp.asarray(field * 2.0, jnp.float32)
    if equivariant:
        field = field[:, None, None, None, :]

    def sample(index, key, images):
        return probabilities(scale[index] * images + field[index], task)

    return sample


def _flip_reference(sample, images, num_samples, flips, task):
    """The TTA decompositions in float64 from the stored float32 p̂_tf [T, F, B, *S, K],
    each evaluated on its own: p̂_tf = flip_f(net_t(flip_f(x)))."""
    p = np.stack(
        [
            np.stack(
                [
                    np.flip(np.asarray(sample(t, None, jnp.flip(images, axes))), axes)
                    for axes in flips
                ]
            )
            for t in range(num_samples)
        ]
    ).astype(np.float64)
    want = _reference(p.reshape(-1, *p.shape[2:]), task)  # pooled over every pair
    per_flip = p.mean(0)  # p̄_f [F, ...]

    def entropy(q):
        ent = -q * np.log(np.where(q > 0, q, 1.0))
        if task == "regions":
            ent = ent - (1 - q) * np.log(np.where(q < 1, 1 - q, 1.0))
        return ent.sum(-1)

    flip_entropy = entropy(per_flip).mean(0)  # mean_f H[p̄_f]
    want.update(
        epistemic=((p - per_flip) ** 2).mean((0, 1)),
        tta=((per_flip - want["mean"]) ** 2).mean(0),
        mutual_information=flip_entropy - want["expected_entropy"],
        tta_information=want["entropy"] - flip_entropy,
    )
    return want


@pytest.mark.parametrize(("task", "chunk_size"), [("wt", 1), ("regions", 3)])
def test_flip_decompositions_equal_a_float64_brute_force(task, chunk_size):
    k = 2 if task == "wt" else 3
    shape = (7, 2, 4, 5, k)  # T = 7: a partial last chunk at 3
    sample = _flip_sample_fn(0, shape, task, equivariant=False)
    images = jnp.asarray(np.random.default_rng(1).normal(size=(*shape[1:-1], 1)), jnp.float32)
    flips = mirror_flips((1, 2))
    assert flips == ((), (1,), (2,), (1, 2))
    out = posterior_predictive(
        sample, images, jax.random.key(1), num_samples=7, chunk_size=chunk_size, task=task,
        flips=flips,
    )  # fmt: skip
    assert isinstance(out, TTAPredictive)
    want = _flip_reference(sample, images, 7, flips, task)
    for name, value in want.items():
        atol = 1e-9 if name in ("aleatoric", "epistemic", "tta") else 1e-6
        np.testing.assert_allclose(getattr(out, name), value, rtol=1e-5, atol=atol, err_msg=name)
    assert np.max(want["tta"]) > 1e-2 and np.max(want["epistemic"]) > 1e-2  # both parts real
    # The law of total variance over (sample, flip): the three parts sum to p̄(1 − p̄).
    mean = want["mean"]
    total = want["aleatoric"] + want["epistemic"] + want["tta"]
    np.testing.assert_allclose(total, mean * (1 - mean), atol=1e-12)
    total = np.asarray(out.aleatoric + out.epistemic + out.tta, np.float64)
    np.testing.assert_allclose(total, mean * (1 - mean), atol=1e-6)
    # ... and so does the entropy: H[p̄] = E[H] + MI (within flips) + TTA information.
    parts = out.expected_entropy + out.mutual_information + out.tta_information
    np.testing.assert_allclose(parts, out.entropy, atol=2e-6)


def test_flips_of_an_equivariant_network_add_no_variance_and_change_no_map():
    shape = (5, 1, 4, 6, 3)
    sample = _flip_sample_fn(2, shape, "regions", equivariant=True)
    images = jnp.asarray(np.random.default_rng(3).normal(size=(*shape[1:-1], 1)), jnp.float32)
    sizes = dict(num_samples=5, chunk_size=2, task="regions")
    plain = posterior_predictive(sample, images, jax.random.key(0), **sizes)
    flipped = posterior_predictive(
        sample, images, jax.random.key(0), flips=mirror_flips((1, 2)), **sizes
    )
    np.testing.assert_array_equal(flipped.tta, 0.0)
    np.testing.assert_array_equal(flipped.tta_information, 0.0)
    for name in Predictive._fields:
        np.testing.assert_allclose(
            getattr(flipped, name), getattr(plain, name), rtol=1e-6, atol=1e-9, err_msg=name
        )
    assert float(np.max(plain.epistemic)) > 1e-3  # the samples differ all the same


def test_identity_flip_alone_is_the_plain_predictive():
    shape = (4, 2, 3, 3, 2)
    sample = _flip_sample_fn(4, shape, "wt", equivariant=False)
    images = jnp.ones((*shape[1:-1], 1), jnp.float32)
    plain = posterior_predictive(sample, images, jax.random.key(0), num_samples=4)
    alone = posterior_predictive(sample, images, jax.random.key(0), num_samples=4, flips=((),))
    for name in Predictive._fields:
        np.testing.assert_array_equal(getattr(alone, name), getattr(plain, name), err_msg=name)
    np.testing.assert_array_equal(alone.tta, 0.0)
