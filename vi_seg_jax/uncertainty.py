"""Posterior predictive sampling and the uncertainty decompositions (method.md §6).

For T posterior samples p̂_t (softmax or per-region sigmoid outputs of network t):

- mean probability p̄ = mean_t p̂_t, prediction argmax p̄ (or p̄ > 0.5 per region);
- Kwon et al. variance split, per class (the diagonal of the covariance):
  aleatoric = mean_t p̂_t(1 − p̂_t), epistemic = mean_t (p̂_t − p̄)²; they sum exactly to
  p̄(1 − p̄);
- entropy split: predictive entropy H[p̄] = expected entropy mean_t H[p̂_t] (aleatoric) +
  mutual information (epistemic), with MI ≥ 0 and H ≤ log K.

Samples are drawn in chunks (`jax.lax.scan` over chunks, `jax.vmap` inside one) and reduced
into a running state, so memory is bounded by the chunk size whatever T is. A sample is one
coherent network: for VI one full draw of the weights (the same draw for every tile of a
volume), for MC dropout one dropout mask, for an ensemble one member.

The running state is float32 and built so that nothing small is the difference of two
large numbers: the epistemic variance is not E[p̂²] − p̄² (where p̄ ≈ 1 that difference is
rounding noise: 0, or tens of times the true variance at logit 7 ± 0.05) but comes from
the mean and the sum of squared deviations from it (M2), computed per chunk in two passes
and merged with Chan et al.'s parallel update; the aleatoric part is a plain sum of
p̂(1 − p̂). So the variance split sums to p̄(1 − p̄) up to rounding, not by construction.

The entropy split keeps the difference form, MI = H[p̄] − mean_t H[p̂_t] clamped at 0: where
every sample is confident, MI is far below H and its float32 error (a few
|log(p̄/(1 − p̄))| · ulp(p̄): some 1e-7 nats at logit 7) can be as large as MI itself, but
that is negligible on the scale MI is read on (nats, up to log K): only its relative
accuracy is lost there.

Test-time augmentation (TTA, `flips`): every sample t is also evaluated on each mirroring f
of the spatial axes (2^3 = 8 in 3D) and mapped back, p̂_tf = flip_f(net_t(flip_f(x))), and
the predictive pools all T·F pairs: p̄ = mean_tf p̂_tf. The loop runs flip by flip (all T
samples under flip 0, then under flip 1, ...; sample t is the same draw, `fold_in(key, t)`,
under every flip), so one flip's running state is open at a time and memory does not grow
with F; the cost is F times the samples'. When a flip's samples are all in, `close_flip`
folds its state into the pooled one (over a mesh: the devices' states of that flip are
pooled first), and the law of total variance over (sample, flip) splits p̄(1 − p̄) three
ways:
  aleatoric = mean_tf p̂_tf(1 − p̂_tf),
  epistemic = mean_f mean_t (p̂_tf − p̄_f)²   (within a flip, across samples),
  tta       = mean_f (p̄_f − p̄)²             (across the flips' means p̄_f),
each a sum of non-negative terms (the between-flip part is Chan's merge term), so
aleatoric + epistemic + tta = p̄(1 − p̄) up to rounding. The entropy splits alike:
H[p̄] = mean_tf H[p̂_tf] + MI (mean_f H[p̄_f] − mean_tf H[p̂_tf], within flips) + the TTA
information (H[p̄] − mean_f H[p̄_f]).

Over a device mesh the chunks are dealt out along its `data` axis (device d takes chunks
d, d + D, ...) and the per-device states are merged at the end (pooled mean, then M2 about
it). Sample t is drawn from `fold_in(key, t)` wherever it runs, so the result is the
single-device one up to the order of floating-point reductions, and each device holds one
chunk's activations at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from vi_seg_jax.bayes.elbo import TaskName, probabilities
from vi_seg_jax.parallel import DATA_AXIS
from vi_seg_jax.task import get_task
from vi_seg_jax.train.state import ModelSpec, TrainState

_TINY = 1e-12

# sample_fn(sample_index, key, images [B, *S, C]) -> probabilities [B, *S, K]
SampleFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class PredictiveSums(NamedTuple):
    """Running state over samples, per voxel and class (the decompositions' inputs)."""

    count: jax.Array  # n, samples so far       []
    mean: jax.Array  # p̄ = mean_t p̂_t            [B, *S, K]
    m2: jax.Array  # Σ_t (p̂_t − p̄)²             [B, *S, K]
    aleatoric: jax.Array  # Σ_t p̂_t(1 − p̂_t)   [B, *S, K]
    entropy: jax.Array  # Σ_t H[p̂_t]             [B, *S]


class TTASums(NamedTuple):
    """Running state over (flip, sample) pairs, for the flips finished so far (`close_flip`)."""

    pooled: PredictiveSums  # the pairs; m2 = Σ_f M2_f, within flips only   [B, *S, K]
    between: jax.Array  # Σ_f n_f (p̄_f − p̄)², across the flips' means       [B, *S, K]
    flip_entropy: jax.Array  # Σ_f n_f H[p̄_f]                               [B, *S]


class Predictive(NamedTuple):
    """Per-voxel outputs of the posterior predictive. K = classes (wt) or regions."""

    mean: jax.Array  # p̄                        [B, *S, K]
    aleatoric: jax.Array  # mean_t p̂(1 − p̂)     [B, *S, K]
    epistemic: jax.Array  # mean_t (p̂ − p̄)²     [B, *S, K]
    entropy: jax.Array  # H[p̄]                   [B, *S]
    expected_entropy: jax.Array  # mean_t H[p̂_t]  [B, *S]
    mutual_information: jax.Array  # H − E[H] ≥ 0  [B, *S]


class TTAPredictive(NamedTuple):
    """`Predictive` over (sample, flip) pairs, with the flips' own parts (module docstring).

    The fields `Predictive` has mean the same over the pairs, except that `epistemic` and
    `mutual_information` are within flips; `tta` and `tta_information` are across them.
    """

    mean: jax.Array  # p̄ = mean_tf p̂_tf                          [B, *S, K]
    aleatoric: jax.Array  # mean_tf p̂(1 − p̂)                      [B, *S, K]
    epistemic: jax.Array  # mean_f mean_t (p̂_tf − p̄_f)²           [B, *S, K]
    entropy: jax.Array  # H[p̄]                                    [B, *S]
    expected_entropy: jax.Array  # mean_tf H[p̂_tf]                 [B, *S]
    mutual_information: jax.Array  # mean_f H[p̄_f] − E[H] ≥ 0      [B, *S]
    tta: jax.Array  # mean_f (p̄_f − p̄)²                            [B, *S, K]
    tta_information: jax.Array  # H[p̄] − mean_f H[p̄_f] ≥ 0         [B, *S]


def entropy(probs: jax.Array, task: TaskName) -> jax.Array:
    """Entropy in nats over the class axis (wt) or summed over independent regions."""
    return get_task(task).entropy(probs)


def summarize(sums: PredictiveSums, task: TaskName) -> Predictive:
    """The decompositions from the running state."""
    count = jnp.maximum(sums.count, 1.0)
    total = entropy(sums.mean, task)
    expected = sums.entropy / count
    return Predictive(
        mean=sums.mean,
        aleatoric=sums.aleatoric / count,
        epistemic=sums.m2 / count,
        entropy=total,
        expected_entropy=expected,
        mutual_information=jnp.maximum(total - expected, 0.0),
    )


def summarize_tta(sums: TTASums, task: TaskName) -> TTAPredictive:
    """The decompositions over (sample, flip) pairs from the state of finished flips."""
    pairs = summarize(sums.pooled, task)
    count = jnp.maximum(sums.pooled.count, 1.0)
    per_flip = sums.flip_entropy / count  # mean_f H[p̄_f] (every flip has T samples)
    # The pooled MI would count the flips' disagreement too; TTA keeps it within flips.
    within = jnp.maximum(per_flip - pairs.expected_entropy, 0.0)
    return TTAPredictive(
        **pairs._replace(mutual_information=within)._asdict(),
        tta=sums.between / count,
        tta_information=jnp.maximum(pairs.entropy - per_flip, 0.0),
    )


def mirror_flips(axes: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Every mirroring of `axes`: the 2^len(axes) subsets, the identity `()` first."""
    return tuple(
        tuple(a for bit, a in enumerate(axes) if flip >> bit & 1) for flip in range(2 ** len(axes))
    )


def flipped_sample_fn(
    sample_fn: SampleFn, flips: tuple[tuple[int, ...], ...], flip: jax.Array
) -> SampleFn:
    """`sample_fn` on the input mirrored along `flips[flip]`, its output mirrored back.

    `flip` may be traced (one compiled function for every flip); the axes index the arrays
    `sample_fn` takes and returns ([*S, C] -> [*S, K] for a volume, [B, *S, C] for a batch).
    """
    branches = [
        (lambda x, axes=axes: jnp.flip(x, axes)) if axes else (lambda x: x) for axes in flips
    ]

    def mirror(x: jax.Array) -> jax.Array:  # every flip is its own inverse
        return jax.lax.switch(flip, branches, x)

    def sample(index: jax.Array, key: jax.Array, images: jax.Array) -> jax.Array:
        return mirror(sample_fn(index, key, mirror(images)))

    return sample


def empty_tta_sums(sums: PredictiveSums) -> TTASums:
    """The state of no flips, shaped like `sums` (one flip's state, e.g. `empty_sums`)."""
    zeros = jnp.zeros_like(sums.mean)
    empty = PredictiveSums(jnp.zeros((), jnp.float32), zeros, zeros, zeros, zeros[..., 0])
    return TTASums(empty, zeros, zeros[..., 0])


def close_flip(sums: TTASums, flip: PredictiveSums, task: TaskName) -> TTASums:
    """Folds one flip's finished state (all its samples, pooled over devices) into `sums`.

    Chan et al.'s merge with its two M2 parts kept apart: the flip's own M2 adds to the
    within-flip sum, the term δ² n_a n_b / n to the between-flip one.
    """
    pooled = sums.pooled
    count = pooled.count + flip.count
    share = flip.count / jnp.maximum(count, 1.0)
    delta = flip.mean - pooled.mean
    return TTASums(
        pooled=PredictiveSums(
            count=count,
            mean=pooled.mean + delta * share,
            m2=pooled.m2 + flip.m2,
            aleatoric=pooled.aleatoric + flip.aleatoric,
            entropy=pooled.entropy + flip.entropy,
        ),
        between=sums.between + jnp.square(delta) * (pooled.count * share),
        flip_entropy=sums.flip_entropy + flip.count * entropy(flip.mean, task),
    )


def empty_sums(sample_fn: SampleFn, images: jax.Array, key: jax.Array) -> PredictiveSums:
    """The state of no samples, shaped like one sample's output on `images`."""
    shape = jax.eval_shape(lambda: sample_fn(jnp.zeros((), jnp.int32), key, images)).shape
    zeros = jnp.zeros(shape, jnp.float32)
    return PredictiveSums(jnp.zeros((), jnp.float32), zeros, zeros, zeros, zeros[..., 0])


def _merge(sums: PredictiveSums, chunk: PredictiveSums) -> PredictiveSums:
    """Chan et al.'s update: the state of two disjoint sets of samples."""
    count = sums.count + chunk.count
    share = chunk.count / jnp.maximum(count, 1.0)  # 0 for an empty chunk or none so far
    delta = chunk.mean - sums.mean
    return PredictiveSums(
        count=count,
        mean=sums.mean + delta * share,
        m2=sums.m2 + chunk.m2 + jnp.square(delta) * (sums.count * share),
        aleatoric=sums.aleatoric + chunk.aleatoric,
        entropy=sums.entropy + chunk.entropy,
    )


def _pool(sums: PredictiveSums, total: Callable[[jax.Array], jax.Array]) -> PredictiveSums:
    """Merges per-device states with sums only: `total(x)` adds x over the devices
    (a psum, or a sum over a leading device axis that keeps it as size 1).

    mean = Σ_d n_d mean_d / Σ_d n_d, M2 = Σ_d [M2_d + n_d (mean_d − mean)²].
    """
    n = sums.count
    weight = n.reshape(n.shape + (1,) * (sums.mean.ndim - n.ndim))
    mean = total(weight * sums.mean) / jnp.maximum(total(weight), 1.0)
    return PredictiveSums(
        count=total(n),
        mean=mean,
        m2=total(sums.m2 + weight * jnp.square(sums.mean - mean)),
        aleatoric=total(sums.aleatoric),
        entropy=total(sums.entropy),
    )


def add_samples(
    sums: PredictiveSums,
    sample_fn: SampleFn,
    images: jax.Array,
    key: jax.Array,
    chunk: jax.Array,
    *,
    chunk_size: int,
    num_samples: int,
    task: TaskName,
) -> PredictiveSums:
    """Adds samples `chunk * chunk_size ...` (those below `num_samples`) to the state."""
    indices = chunk * chunk_size + jnp.arange(chunk_size)
    valid = (indices < num_samples).astype(jnp.float32)
    one = lambda t: sample_fn(t, jax.random.fold_in(key, t), images)  # noqa: E731
    # A chunk of one skips vmap: vmapped per-sample kernels make grouped convolutions.
    probs = one(indices[0])[None] if chunk_size == 1 else jax.vmap(one)(indices)
    probs = probs.astype(jnp.float32)
    weight = valid.reshape((-1,) + (1,) * (probs.ndim - 1))
    count = jnp.sum(valid)
    # Two passes over the chunk: its mean, then squared deviations from it.
    mean = jnp.sum(weight * probs, axis=0, keepdims=True) / jnp.maximum(count, 1.0)
    own = PredictiveSums(
        count=count,
        mean=mean[0],
        m2=jnp.sum(weight * jnp.square(probs - mean), axis=0),
        aleatoric=jnp.sum(weight * probs * (1.0 - probs), axis=0),
        entropy=jnp.sum(weight[..., 0] * entropy(probs, task), axis=0),
    )
    return _merge(sums, own)


def num_chunks(num_samples: int, chunk_size: int) -> int:
    if num_samples < 1 or chunk_size < 1:
        raise ValueError("num_samples and chunk_size must be >= 1")
    return -(-num_samples // chunk_size)


def posterior_predictive(
    sample_fn: SampleFn,
    images: jax.Array,
    key: jax.Array,
    *,
    num_samples: int,
    chunk_size: int = 1,
    task: TaskName = "wt",
    mesh: Mesh | None = None,
    flips: tuple[tuple[int, ...], ...] | None = None,
) -> Predictive | TTAPredictive:
    """T samples of the network on `images`, reduced into a running state.

    Args:
      sample_fn: `(index, key, images) -> probabilities` of one posterior sample.
      images: [B, *S, C] (or one volume, for `inference.volume_sample_fn`).
      key: fixes every sample (sample t uses `fold_in(key, t)`).
      num_samples: T.
      chunk_size: samples evaluated together (vmapped) per device; memory grows with it,
        not T.
      task: how probabilities are normalised (for the entropies).
      mesh: spread the samples over this mesh's `data` axis (None: one device).
      flips: test-time augmentation: evaluate every sample on each of these mirrorings
        (axes of `images`, e.g. `mirror_flips((1, 2))` for [B, H, W, C]), flip by flip;
        None: none.

    Returns:
      The per-voxel predictive outputs (`TTAPredictive` with `flips`).
    """
    devices = 1 if mesh is None else mesh.size

    def device_sums(images: jax.Array, key: jax.Array, device, fn: SampleFn) -> PredictiveSums:
        def add_chunk(sums: PredictiveSums, step: jax.Array) -> tuple[PredictiveSums, None]:
            sums = add_samples(
                sums,
                fn,
                images,
                key,
                step * devices + device,
                chunk_size=chunk_size,
                num_samples=num_samples,
                task=task,
            )
            return sums, None

        steps = jnp.arange(num_chunks(num_samples, chunk_size * devices))
        sums, _ = jax.lax.scan(add_chunk, empty_sums(fn, images, key), steps)
        return sums

    def device_tta(images: jax.Array, key: jax.Array, device, pool: Callable) -> TTASums:
        # Flip by flip: a flip's samples (over every device: `pool`) close before the next.
        def one_flip(sums: TTASums, flip: jax.Array) -> tuple[TTASums, None]:
            own = device_sums(images, key, device, flipped_sample_fn(sample_fn, flips, flip))
            return close_flip(sums, pool(own), task), None

        start = empty_tta_sums(empty_sums(sample_fn, images, key))
        sums, _ = jax.lax.scan(one_flip, start, jnp.arange(len(flips)))
        return sums

    if devices == 1:
        if flips is not None:
            return summarize_tta(device_tta(images, key, 0, lambda sums: sums), task)
        return summarize(device_sums(images, key, 0, sample_fn), task)

    def on_device(images: jax.Array, key: jax.Array) -> PredictiveSums | TTASums:
        device = jax.lax.axis_index(DATA_AXIS)
        if flips is not None:
            return device_tta(images, key, device, lambda s: _psum_devices(s, DATA_AXIS))
        sums = device_sums(images, key, device, sample_fn)
        return _psum_devices(sums, DATA_AXIS)

    # No varying-axis type checks: sample functions hold their own scans (sliding windows)
    # whose carries would all need annotating; the psums make the output replicated.
    sums = jax.shard_map(on_device, mesh=mesh, in_specs=(P(), P()), out_specs=P(), check_vma=False)(
        images, key
    )
    return summarize(sums, task) if flips is None else summarize_tta(sums, task)


def add_samples_per_device(
    mesh: Mesh,
    sums: PredictiveSums,
    sample_fn: SampleFn,
    images: jax.Array,
    key: jax.Array,
    step: jax.Array,
    *,
    chunk_size: int,
    num_samples: int,
    task: TaskName,
) -> PredictiveSums:
    """`add_samples` on every device of `mesh`: device d adds chunk `step * D + d`.

    `sums` holds one state per device, stacked along a leading axis sharded along `data`
    (`empty_sums` broadcast to [D, ...]); `sum_devices` merges them.
    """
    devices = mesh.size

    def on_device(sums: PredictiveSums, images: jax.Array, key: jax.Array) -> PredictiveSums:
        own = jax.tree_util.tree_map(lambda x: x[0], sums)
        chunk = step * devices + jax.lax.axis_index(DATA_AXIS)
        own = add_samples(
            own,
            sample_fn,
            images,
            key,
            chunk,
            chunk_size=chunk_size,
            num_samples=num_samples,
            task=task,
        )
        return jax.tree_util.tree_map(lambda x: x[None], own)

    split = P(DATA_AXIS)
    return jax.shard_map(
        on_device, mesh=mesh, in_specs=(split, P(), P()), out_specs=split, check_vma=False
    )(sums, images, key)


def _psum_devices(sums: PredictiveSums, axis_name: str) -> PredictiveSums:
    """Merges the states of all devices along `axis_name` (inside `shard_map`)."""
    return _pool(sums, lambda x: jax.lax.psum(x, axis_name))


def sum_devices(sums: PredictiveSums) -> PredictiveSums:
    """Per-device states stacked [D, ...] (`add_samples_per_device`) → one state."""
    pooled = _pool(sums, lambda x: jnp.sum(x, axis=0, keepdims=True))
    return jax.tree_util.tree_map(lambda x: x[0], pooled)


def sample_fn_for(spec: ModelSpec, state: TrainState) -> SampleFn:
    """One posterior sample of the trained model, whatever the method."""
    task = spec.objective.likelihood.task

    def sample(index, key, images):
        logits = spec.strategy.sample_logits(
            spec.backbone, state.params, state.guide, index, key, images
        )
        return probabilities(logits.astype(jnp.float32), task)

    return sample
