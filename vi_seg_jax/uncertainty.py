"""Posterior predictive sampling and the uncertainty decompositions (method.md §6).

For T posterior samples p̂_t (softmax or per-region sigmoid outputs of network t):

- mean probability p̄ = mean_t p̂_t, prediction argmax p̄ (or p̄ > 0.5 per region);
- Kwon et al. variance split, per class (the diagonal of the covariance):
  aleatoric = mean_t p̂_t(1 − p̂_t), epistemic = mean_t (p̂_t − p̄)²; they sum exactly to
  p̄(1 − p̄);
- entropy split: predictive entropy H[p̄] = expected entropy mean_t H[p̂_t] (aleatoric) +
  mutual information (epistemic), with MI ≥ 0 and H ≤ log K.

Samples are drawn in chunks (`jax.lax.scan` over chunks, `jax.vmap` inside one) and reduced
into running sums, so memory is bounded by the chunk size whatever T is. A sample is one
coherent network: for VI one full draw of the weights (the same draw for every tile of a
volume), for MC dropout one dropout mask, for an ensemble one member.

Over a device mesh the chunks are dealt out along its `data` axis (device d takes chunks
d, d + D, ...) and the per-device sums are added at the end. Sample t is drawn from
`fold_in(key, t)` wherever it runs, so the result is the single-device one up to the order
of the final sums, and each device holds one chunk's activations at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from vi_seg_jax.bayes.elbo import Task, probabilities
from vi_seg_jax.bayes.guide import merge_params, sample_kernels
from vi_seg_jax.bayes.layers import apply_backbone, apply_sampled
from vi_seg_jax.parallel import DATA_AXIS
from vi_seg_jax.train.state import ModelSpec, TrainState

_TINY = 1e-12

# sample_fn(sample_index, key, images [B, *S, C]) -> probabilities [B, *S, K]
SampleFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class PredictiveSums(NamedTuple):
    """Running sums over samples, per voxel and class."""

    count: jax.Array  # []
    p: jax.Array  # Σ p̂_t           [B, *S, K]
    p_squared: jax.Array  # Σ p̂_t²          [B, *S, K]
    entropy: jax.Array  # Σ H[p̂_t]        [B, *S]


class Predictive(NamedTuple):
    """Per-voxel outputs of the posterior predictive. K = classes (wt) or regions."""

    mean: jax.Array  # p̄                        [B, *S, K]
    aleatoric: jax.Array  # mean_t p̂(1 − p̂)     [B, *S, K]
    epistemic: jax.Array  # mean_t (p̂ − p̄)²     [B, *S, K]
    entropy: jax.Array  # H[p̄]                   [B, *S]
    expected_entropy: jax.Array  # mean_t H[p̂_t]  [B, *S]
    mutual_information: jax.Array  # H − E[H] ≥ 0  [B, *S]


def entropy(probs: jax.Array, task: Task) -> jax.Array:
    """Entropy in nats over the class axis (wt) or summed over independent regions."""
    if task == "wt":
        return -jnp.sum(probs * jnp.log(probs + _TINY), axis=-1)
    binary = -(probs * jnp.log(probs + _TINY) + (1.0 - probs) * jnp.log(1.0 - probs + _TINY))
    return jnp.sum(binary, axis=-1)


def summarize(sums: PredictiveSums, task: Task) -> Predictive:
    """The decompositions from running sums."""
    mean = sums.p / sums.count
    second = sums.p_squared / sums.count
    total = entropy(mean, task)
    expected = sums.entropy / sums.count
    return Predictive(
        mean=mean,
        aleatoric=mean - second,
        epistemic=jnp.maximum(second - jnp.square(mean), 0.0),
        entropy=total,
        expected_entropy=expected,
        mutual_information=jnp.maximum(total - expected, 0.0),
    )


def empty_sums(sample_fn: SampleFn, images: jax.Array, key: jax.Array) -> PredictiveSums:
    """Zero running sums shaped like one sample's output on `images`."""
    shape = jax.eval_shape(lambda: sample_fn(jnp.zeros((), jnp.int32), key, images)).shape
    zeros = jnp.zeros(shape, jnp.float32)
    return PredictiveSums(jnp.zeros((), jnp.float32), zeros, zeros, zeros[..., 0])


def add_samples(
    sums: PredictiveSums,
    sample_fn: SampleFn,
    images: jax.Array,
    key: jax.Array,
    chunk: jax.Array,
    *,
    chunk_size: int,
    num_samples: int,
    task: Task,
) -> PredictiveSums:
    """Adds samples `chunk * chunk_size ...` (those below `num_samples`) to the sums."""
    indices = chunk * chunk_size + jnp.arange(chunk_size)
    valid = (indices < num_samples).astype(jnp.float32)
    one = lambda t: sample_fn(t, jax.random.fold_in(key, t), images)  # noqa: E731
    # A chunk of one skips vmap: vmapped per-sample kernels make grouped convolutions.
    probs = one(indices[0])[None] if chunk_size == 1 else jax.vmap(one)(indices)
    weight = valid.reshape((-1,) + (1,) * (probs.ndim - 1))
    return PredictiveSums(
        count=sums.count + jnp.sum(valid),
        p=sums.p + jnp.sum(weight * probs, axis=0),
        p_squared=sums.p_squared + jnp.sum(weight * jnp.square(probs), axis=0),
        entropy=sums.entropy + jnp.sum(weight[..., 0] * entropy(probs, task), axis=0),
    )


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
    task: Task = "wt",
    mesh: Mesh | None = None,
) -> Predictive:
    """T samples of the network on `images`, reduced with running sums.

    Args:
      sample_fn: `(index, key, images) -> probabilities` of one posterior sample.
      images: [B, *S, C] (or one volume, for `inference.volume_sample_fn`).
      key: fixes every sample (sample t uses `fold_in(key, t)`).
      num_samples: T.
      chunk_size: samples evaluated together (vmapped) per device; memory grows with it,
        not T.
      task: how probabilities are normalised (for the entropies).
      mesh: spread the samples over this mesh's `data` axis (None: one device).

    Returns:
      The per-voxel predictive outputs.
    """
    devices = 1 if mesh is None else mesh.size

    def device_sums(images: jax.Array, key: jax.Array, device) -> PredictiveSums:
        def add_chunk(sums: PredictiveSums, step: jax.Array) -> tuple[PredictiveSums, None]:
            sums = add_samples(
                sums,
                sample_fn,
                images,
                key,
                step * devices + device,
                chunk_size=chunk_size,
                num_samples=num_samples,
                task=task,
            )
            return sums, None

        steps = jnp.arange(num_chunks(num_samples, chunk_size * devices))
        sums, _ = jax.lax.scan(add_chunk, empty_sums(sample_fn, images, key), steps)
        return sums

    if devices == 1:
        return summarize(device_sums(images, key, 0), task)

    def on_device(images: jax.Array, key: jax.Array) -> PredictiveSums:
        sums = device_sums(images, key, jax.lax.axis_index(DATA_AXIS))
        return jax.lax.psum(sums, DATA_AXIS)

    # No varying-axis type checks: sample functions hold their own scans (sliding windows)
    # whose carries would all need annotating; the psum makes the output replicated.
    sums = jax.shard_map(on_device, mesh=mesh, in_specs=(P(), P()), out_specs=P(), check_vma=False)(
        images, key
    )
    return summarize(sums, task)


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
    task: Task,
) -> PredictiveSums:
    """`add_samples` on every device of `mesh`: device d adds chunk `step * D + d`.

    `sums` holds one set of sums per device, stacked along a leading axis sharded along
    `data` (`empty_sums` broadcast to [D, ...]); `sum_devices` reduces them.
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


def sum_devices(sums: PredictiveSums) -> PredictiveSums:
    """Per-device sums [D, ...] (`add_samples_per_device`) → one set of sums."""
    return jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), sums)


def sample_fn_for(spec: ModelSpec, state: TrainState) -> SampleFn:
    """One posterior sample of the trained model, whatever the method."""
    task = spec.objective.likelihood.task
    method = spec.method.method

    def sample(index, key, images):
        if method == "vi":
            logits, _ = apply_sampled(
                spec.backbone, state.params, sample_kernels(key, state.guide), images
            )
        elif method == "mc_dropout":
            logits, _ = apply_backbone(
                spec.backbone, state.params, images, train=True, dropout_key=key
            )
        elif method == "ensemble":
            member = jax.tree_util.tree_map(
                lambda leaf: jax.lax.dynamic_index_in_dim(
                    leaf, index % spec.method.ensemble_size, keepdims=False
                ),
                state.params,
            )
            logits, _ = apply_backbone(spec.backbone, member, images, train=False)
        else:
            logits, _ = apply_backbone(spec.backbone, state.params, images, train=False)
        return probabilities(logits.astype(jnp.float32), task)

    return sample


def mean_weight_probabilities(spec: ModelSpec, state: TrainState, images: jax.Array) -> jax.Array:
    """Prediction of the mean network (the paper code's evaluation: no uncertainty)."""
    task = spec.objective.likelihood.task
    if spec.method.method == "vi":
        params = merge_params(state.params, state.guide.loc)
    elif spec.method.method == "ensemble":
        probs = jax.vmap(
            lambda p: probabilities(apply_backbone(spec.backbone, p, images, train=False)[0], task)
        )(state.params)
        return jnp.mean(probs, axis=0)
    else:
        params = state.params
    logits, _ = apply_backbone(spec.backbone, params, images, train=False)
    return probabilities(logits.astype(jnp.float32), task)
