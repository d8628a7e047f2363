"""Running a plain backbone as a Bayesian network.

Two estimators of the forward pass under q(w):

- **local reparameterisation** (`apply_lrt`, the paper code's training path): for each
  Bayesian convolution, out = conv(x, μ) + sqrt(1e-10 + conv(x², σ²)) · ε with ε drawn
  per output activation. It is exact in distribution for each activation given its input
  and has lower gradient variance than sampling weights.
- **full weight sampling** (`apply_sampled`): one weight draw per network, so a sample is
  one coherent network (the NumPyro reference path and the Monte Carlo prediction path).

The backbone is untouched: `flax.linen.intercept_methods` routes each chosen `nn.Conv` by
its parameter path through the guide's location and variance.
"""

from __future__ import annotations

import contextlib
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import lax

from vi_seg_jax.bayes.guide import GuideParams, merge_params
from vi_seg_jax.ops.materialize import materialize
from vi_seg_jax.ops.partitioning import Rows, rowwise

LRT_EPSILON = 1e-10


def apply_backbone(
    backbone: nn.Module,
    params,
    images: jax.Array,
    *,
    train: bool,
    dropout_key: jax.Array | None = None,
):
    """Plain forward pass; dropout is active when `train` and a key is given."""
    rngs = {"dropout": dropout_key} if dropout_key is not None else {}
    return backbone.apply({"params": params}, images, train=train, rngs=rngs)


def apply_sampled(
    backbone, deterministic, kernels, images, *, train: bool = False, dropout_key=None
):
    """Forward pass of the network with the given kernel draw (see `sample_kernels`)."""
    return apply_backbone(
        backbone, merge_params(deterministic, kernels), images, train=train, dropout_key=dropout_key
    )


def apply_lrt(
    backbone,
    deterministic,
    guide: GuideParams,
    images,
    *,
    key: jax.Array,
    train: bool = True,
    dropout_key=None,
):
    """Forward pass with the local reparameterisation trick.

    Args:
      backbone: a plain Flax backbone.
      deterministic: its non-Bayesian parameters.
      guide: q(w) over the Bayesian kernels.
      images: [B, *S, C].
      key: noise for the pre-activations (one 128-bit seed per layer, in path order).

    Returns:
      The backbone's `(logits, aux)`.
    """
    locs = traverse_util.flatten_dict(guide.loc)
    variances = traverse_util.flatten_dict(jax.tree_util.tree_map(jnp.exp, guide.log_var))
    layers = sorted(path[:-1] for path in locs)
    seeds = jax.random.bits(key, (len(layers), 4), jnp.uint32)
    with _intercept_convs(locs, variances, dict(zip(layers, seeds, strict=True))):
        return apply_backbone(backbone, deterministic, images, train=train, dropout_key=dropout_key)


def standard_normal(seed: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """Standard normal draws from a 128-bit `seed` (`uint32[4]`): XLA's own Threefry bit
    generator, then the inverse CDF that `jax.random.normal` applies to its bits.

    The LRT draws one ε per activation of every Bayesian conv (60 M per step of the paper
    U-Net at 2 × 64³). `jax.random`'s Threefry, written in array ops, made that a quarter
    of a CPU training step; XLA's generator is about 4× faster there, and drawn per layer
    the transform fuses into the one pass that uses the noise (`_lrt_output_forward`).
    """
    bits = _bit_generator(tuple(int(n) for n in shape))(seed)
    # [0, 1) from the 23 mantissa bits, mapped to (-1, 1) as `jax.random.uniform` does.
    unit = lax.bitcast_convert_type((bits >> 9) | np.uint32(0x3F800000), jnp.float32) - 1.0
    low = np.nextafter(np.float32(-1.0), np.float32(0.0))
    uniform = jnp.maximum(low, unit * (1.0 - low) + low)
    return (np.float32(np.sqrt(2.0)) * lax.erf_inv(uniform)).astype(dtype)


@functools.cache
def _bit_generator(shape: tuple[int, ...]):
    """`seed -> uint32 bits of shape` by XLA's Threefry, the same under `vmap` as alone and
    drawn by each device for its own rows of the batch (the leading axis) over a mesh.

    `lax.rng_bit_generator`'s own batching rule draws the whole batch from the first seed,
    so a particle's noise would depend on the particles beside it; here each seed draws its
    own stream, one after the other (particles are few)."""

    def draw(seed, *, rows: Rows | None):
        return _three_fry(seed, shape) if rows is None else _rows_of_draw(seed, shape, rows)

    return rowwise(draw, (False,))


def _three_fry(seed, shape):
    return lax.rng_bit_generator(
        seed, shape, jnp.uint32, algorithm=lax.RandomAlgorithm.RNG_THREE_FRY
    )[1]


def _rows_of_draw(seed, shape, rows: Rows):
    """Rows `rows` of `_three_fry(seed, shape)`, drawing (about) only those.

    XLA's Threefry gives two words per counter and lays them out along the first even
    dimension: rows 2j and 2j + 1 of an even batch are the two words of counters
    `j * row_size + i`. A device draws its pairs of rows from the counter of its first pair
    (one extra row where its share starts or ends inside a pair). An odd batch splits
    elsewhere: there each device draws it all and keeps its rows.
    """
    if rows.total % 2:
        return lax.dynamic_slice_in_dim(_three_fry(seed, shape), rows.start, rows.count)
    first_pair = rows.start // 2
    drawn = rows.count + rows.count % 2
    seed = _advance_counter(seed, first_pair, math.prod(shape[1:]))
    bits = _three_fry(seed, (drawn, *shape[1:]))
    return lax.dynamic_slice_in_dim(bits, rows.start - 2 * first_pair, rows.count)


def _advance_counter(seed, steps, step_size: int):
    """`seed` (`uint32[4]`: key, then the 64-bit counter low word first) with its counter
    moved on by `steps * step_size` (`steps` < 2**16, `step_size` < 2**32)."""
    steps = steps.astype(jnp.uint32)
    low_part = steps * np.uint32(step_size & 0xFFFF)
    high_part = steps * np.uint32(step_size >> 16)  # times 2**16
    add_low = low_part + (high_part << 16)
    add_high = (high_part >> 16) + (add_low < low_part).astype(jnp.uint32)
    low = seed[2] + add_low
    high = seed[3] + add_high + (low < seed[2]).astype(jnp.uint32)
    return seed.at[2].set(low).at[3].set(high)


# The two functions below change what the backward pass keeps, not what it computes: per
# Bayesian conv, the input instead of its square, and one array instead of the noise and
# the standard deviation (two fewer activation-sized arrays per layer; 128³ needs it).


def _conv_of_square(conv, x, kernel):
    """`conv(x², kernel)`, keeping `x` (not `x²`) for the backward pass."""

    @jax.custom_vjp
    def conv_of_square(x, kernel):
        return conv(jnp.square(x), kernel)

    def forward(x, kernel):
        return conv_of_square(x, kernel), (x, kernel)

    def backward(residuals, cotangent):
        x, kernel = residuals
        # x² again from an opaque zero that waits for the cotangent: a plain `x²` would be
        # merged with the forward one (kept alive until here) or hoisted to the forward pass.
        zero = materialize(jnp.zeros((), x.dtype), after=cotangent)
        # Only the conv's gradients are used: XLA drops the recomputed forward conv.
        _, vjp = jax.vjp(conv, jnp.square(x + zero), kernel)
        d_square, d_kernel = vjp(cotangent)
        return 2 * x * d_square, d_kernel

    conv_of_square.defvjp(forward, backward)
    return conv_of_square(x, kernel)


@jax.custom_vjp
def _lrt_output(mean, variance, noise):
    """`mean + sqrt(variance + ε) · noise` (the noise is not differentiated)."""
    return mean + jnp.sqrt(variance + LRT_EPSILON) * noise


def _lrt_output_forward(mean, variance, noise):
    variance = variance + LRT_EPSILON
    # d output / d variance first, written out (it is what the backward pass keeps), and the
    # output from it: sqrt(v) · noise = 2v · noise / (2 sqrt(v)). The noise then has one
    # consumer, so XLA draws and transforms it in one pass.
    d_variance = materialize(noise * (0.5 * lax.rsqrt(variance)))
    return mean + 2 * variance * d_variance, d_variance


def _lrt_output_backward(d_variance, cotangent):
    return cotangent, cotangent * d_variance, None


_lrt_output.defvjp(_lrt_output_forward, _lrt_output_backward)


@contextlib.contextmanager
def _intercept_convs(locs, variances, seeds):
    inside = [False]  # the replacement convolutions must not be intercepted themselves

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if inside[0] or context.method_name != "__call__" or not isinstance(module, nn.Conv):
            return next_fun(*args, **kwargs)
        path = tuple(module.path)
        if path not in seeds:
            return next_fun(*args, **kwargs)
        (inputs,) = args
        mean_params = {"kernel": locs[(*path, "kernel")]}
        if module.use_bias:
            mean_params["bias"] = module.get_variable("params", "bias")
        inside[0] = True
        try:
            mean = module.clone(parent=None).apply({"params": mean_params}, inputs)
            variance_conv = module.clone(parent=None, use_bias=False)
            variance = _conv_of_square(
                lambda squared, kernel: variance_conv.apply(
                    {"params": {"kernel": kernel}}, squared
                ),
                inputs,
                variances[(*path, "kernel")],
            )
        finally:
            inside[0] = False
        # The noise is drawn once the layer's input exists, not hoisted to the start of
        # the step (where all layers' noise would be held at once).
        seed = materialize(seeds[path], after=lax.stop_gradient(inputs))
        return _lrt_output(mean, variance, standard_normal(seed, mean.shape, mean.dtype))

    with nn.intercept_methods(interceptor):
        yield
