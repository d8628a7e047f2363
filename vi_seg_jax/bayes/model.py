"""The probabilistic model and guide written as NumPyro programs.

These are the reference statement of what `train_step` optimises: with a pure
cross-entropy likelihood (`ce_weight=1, dice_weight=0, reduction="sum"`), full weight
sampling and the N(0, s²) prior, `loss_fn` equals NumPyro's `TraceMeanField_ELBO` on
these two functions (tested). Training uses the vectorised engine in `train/step.py`
instead, which adds local reparameterisation, the Dice term, KL warm-up and the
deep weight prior.

    model:  w ~ N(0, s²)           for every Bayesian kernel
            y_b ~ Categorical(softmax(f(x_b; w, θ)))   per voxel, b in a subsampled
                                                      plate of size N (scaled N/B)
    guide:  w ~ N(loc, exp(log_var))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from flax import traverse_util

from vi_seg_jax.bayes.elbo import TaskName, targets
from vi_seg_jax.bayes.guide import GuideParams
from vi_seg_jax.bayes.layers import apply_sampled


def site_name(path: tuple[str, ...]) -> str:
    return ".".join(path)


def model(
    images,
    labels=None,
    *,
    backbone,
    deterministic,
    kernel_shapes,
    prior_scale=1.0,
    num_data,
    task: TaskName = "wt",
):
    """p(w) p(y | x, w) with the data plate subsampled to the batch.

    Args:
      images: [B, *S, C].
      labels: [B, *S] canonical classes, or None to sample.
      backbone: the plain Flax backbone.
      deterministic: its non-Bayesian parameters (held fixed here).
      kernel_shapes: {path: shape} of the Bayesian kernels.
      prior_scale: s of the N(0, s²) prior.
      num_data: N, the plate size (training examples in the likelihood's unit).
      task: only `"wt"` (a categorical likelihood) is supported here.
    """
    if task != "wt":
        raise ValueError("the NumPyro reference model covers task='wt' only")
    kernels = {
        path: numpyro.sample(
            site_name(path), dist.Normal(0.0, prior_scale).expand(shape).to_event(len(shape))
        )
        for path, shape in sorted(kernel_shapes.items())
    }
    logits, _ = apply_sampled(
        backbone, deterministic, traverse_util.unflatten_dict(kernels), images
    )
    observed = None if labels is None else targets(labels, task)
    spatial_dims = images.ndim - 2
    with numpyro.plate("data", num_data, subsample_size=images.shape[0]):
        numpyro.sample(
            "labels", dist.Categorical(logits=logits).to_event(spatial_dims), obs=observed
        )


def guide(images, labels=None, *, init: GuideParams, **unused):
    """Mean-field Gaussian q(w), parameters named `<site>.loc` and `<site>.log_var`."""
    del images, labels, unused
    locs = traverse_util.flatten_dict(init.loc)
    log_vars = traverse_util.flatten_dict(init.log_var)
    for path in sorted(locs):
        name = site_name(path)
        loc = numpyro.param(f"{name}.loc", locs[path])
        log_var = numpyro.param(f"{name}.log_var", log_vars[path])
        numpyro.sample(name, dist.Normal(loc, jnp.exp(0.5 * log_var)).to_event(loc.ndim))


def guide_param_map(guide_params: GuideParams) -> dict[str, jax.Array]:
    """GuideParams as the `param_map` NumPyro's ELBO objects take."""
    locs = traverse_util.flatten_dict(guide_params.loc)
    log_vars = traverse_util.flatten_dict(guide_params.log_var)
    params = {f"{site_name(p)}.loc": v for p, v in locs.items()}
    params.update({f"{site_name(p)}.log_var": v for p, v in log_vars.items()})
    return params
