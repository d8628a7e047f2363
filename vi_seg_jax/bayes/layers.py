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
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from vi_seg_jax.bayes.guide import GuideParams, merge_params

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
      key: noise for the pre-activations (one draw for all layers, split in path order).

    Returns:
      The backbone's `(logits, aux)`.
    """
    locs = traverse_util.flatten_dict(guide.loc)
    variances = traverse_util.flatten_dict(jax.tree_util.tree_map(jnp.exp, guide.log_var))
    layers = sorted(path[:-1] for path in locs)
    noise = _layer_noise(key, _conv_output_shapes(backbone, deterministic, guide, images, layers))
    with _intercept_convs(locs, variances, noise):
        return apply_backbone(backbone, deterministic, images, train=train, dropout_key=dropout_key)


def _conv_output_shapes(backbone, deterministic, guide, images, layers):
    """Output shape of each Bayesian convolution, found by abstract evaluation."""
    shapes = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and tuple(context.module.path) in layers:
            shapes[tuple(context.module.path)] = out.shape
        return out

    def forward(params):
        with nn.intercept_methods(record):
            return apply_backbone(backbone, params, images, train=False)

    jax.eval_shape(forward, merge_params(deterministic, guide.loc))
    return shapes


def _layer_noise(key, shapes):
    """ε for every layer from one `normal` call (one random-bits kernel compiles fast)."""
    layers = sorted(shapes)
    sizes = [math.prod(shapes[layer]) for layer in layers]
    flat = jax.random.normal(key, (sum(sizes),), jnp.float32)
    noise, start = {}, 0
    for layer, size in zip(layers, sizes, strict=True):
        noise[layer] = flat[start : start + size].reshape(shapes[layer])
        start += size
    return noise


@contextlib.contextmanager
def _intercept_convs(locs, variances, noise):
    inside = [False]  # the replacement convolutions must not be intercepted themselves

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if inside[0] or context.method_name != "__call__" or not isinstance(module, nn.Conv):
            return next_fun(*args, **kwargs)
        path = tuple(module.path)
        if path not in noise:
            return next_fun(*args, **kwargs)
        (inputs,) = args
        mean_params = {"kernel": locs[(*path, "kernel")]}
        if module.use_bias:
            mean_params["bias"] = module.get_variable("params", "bias")
        inside[0] = True
        try:
            mean = module.clone(parent=None).apply({"params": mean_params}, inputs)
            variance = module.clone(parent=None, use_bias=False).apply(
                {"params": {"kernel": variances[(*path, "kernel")]}}, jnp.square(inputs)
            )
        finally:
            inside[0] = False
        return mean + jnp.sqrt(variance + LRT_EPSILON) * noise[path].astype(mean.dtype)

    with nn.intercept_methods(interceptor):
        yield
