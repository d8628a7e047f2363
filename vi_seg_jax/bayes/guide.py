"""The mean-field Gaussian guide q(w) over a backbone's chosen convolution kernels.

The backbones stay plain Flax modules. This module works on their parameter tree only:
it picks the Bayesian kernels (by default every 3×3(×3) convolution kernel, as in the
paper's code; 1×1 convolutions, biases and norms stay deterministic), holds a location
and a log-variance per weight (the paper code's `logsigma` is a log-variance), and draws
weight samples. Parameters are stored unconstrained; `scale` is the one place they are
constrained.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util

ParamPath = tuple[str, ...]
Params = Mapping[str, object]


def is_spatial_3x3_kernel(path: ParamPath, leaf: jax.Array) -> bool:
    """The default Bayesian selection: convolution kernels whose spatial size is all 3s."""
    return path[-1] == "kernel" and leaf.ndim in (4, 5) and all(s == 3 for s in leaf.shape[:-2])


@dataclasses.dataclass(frozen=True)
class GuideConfig:
    """How q(w) is initialised (method.md §3).

    Attributes:
      init_loc_std: locations start as N(0, init_loc_std²) draws (paper code: 0.02). With
        `None` they start from the backbone's own initialisation (e.g. a warm start from a
        deterministic checkpoint).
      init_log_var: initial log-variance of every weight (paper code −5, deep weight
        prior code −10).
    """

    init_loc_std: float | None = 0.02
    init_log_var: float = -5.0


@struct.dataclass
class GuideParams:
    """Variational parameters, nested like the backbone's params but holding only the
    Bayesian kernels."""

    loc: dict  # path -> [*kernel_shape] float32
    log_var: dict  # path -> [*kernel_shape] float32, log σ²

    def scale(self) -> dict:
        """σ = exp(log_var / 2)."""
        return jax.tree_util.tree_map(lambda v: jnp.exp(0.5 * v), self.log_var)

    @property
    def num_weights(self) -> int:
        return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(self.loc))


def bayesian_paths(
    params: Params, select: Callable[[ParamPath, jax.Array], bool] = is_spatial_3x3_kernel
) -> tuple[ParamPath, ...]:
    """Sorted parameter paths that the guide covers."""
    flat = traverse_util.flatten_dict(dict(params))
    return tuple(sorted(path for path, leaf in flat.items() if select(path, leaf)))


def split_params(params: Params, paths: tuple[ParamPath, ...]) -> tuple[dict, dict]:
    """Splits a parameter tree into (Bayesian kernels, deterministic rest), both nested."""
    flat = traverse_util.flatten_dict(dict(params))
    chosen = set(paths)
    kernels = {p: v for p, v in flat.items() if p in chosen}
    rest = {p: v for p, v in flat.items() if p not in chosen}
    return traverse_util.unflatten_dict(kernels), traverse_util.unflatten_dict(rest)


def merge_params(deterministic: Params, kernels: Params) -> dict:
    """The full parameter tree from deterministic parameters and Bayesian kernels."""
    flat = traverse_util.flatten_dict(dict(deterministic))
    flat.update(traverse_util.flatten_dict(dict(kernels)))
    return traverse_util.unflatten_dict(flat)


def init_guide(key: jax.Array, kernels: Params, config: GuideConfig) -> GuideParams:
    """Initial q(w) for the given Bayesian kernels (their values used only when
    `config.init_loc_std` is None)."""
    leaves, treedef = jax.tree_util.tree_flatten(kernels)
    keys = jax.random.split(key, max(len(leaves), 1))
    if config.init_loc_std is None:
        locs = [jnp.asarray(leaf, jnp.float32) for leaf in leaves]
    else:
        locs = [
            config.init_loc_std * jax.random.normal(k, leaf.shape, jnp.float32)
            for k, leaf in zip(keys, leaves, strict=False)
        ]
    log_vars = [jnp.full(leaf.shape, config.init_log_var, jnp.float32) for leaf in leaves]
    return GuideParams(
        loc=jax.tree_util.tree_unflatten(treedef, locs),
        log_var=jax.tree_util.tree_unflatten(treedef, log_vars),
    )


def sample_kernels(key: jax.Array, guide: GuideParams) -> dict:
    """One draw w = loc + σ·ε of every Bayesian kernel (reparameterised).

    All ε come from one `normal` call, split afterwards: one random-bits kernel instead of
    one per layer keeps compilation fast.
    """
    locs, treedef = jax.tree_util.tree_flatten(guide.loc)
    scales = jax.tree_util.tree_leaves(guide.scale())
    sizes = [loc.size for loc in locs]
    noise = jax.random.normal(key, (sum(sizes),), jnp.float32)
    offsets = np.cumsum([0, *sizes])
    draws = [
        loc + scale * noise[start:stop].reshape(loc.shape).astype(loc.dtype)
        for loc, scale, start, stop in zip(locs, scales, offsets[:-1], offsets[1:], strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, draws)


def spread_report(guide: GuideParams) -> dict[str, float]:
    """How far q(w) spreads over all its weights: quantiles of log σ², and the share of weights
    whose σ exceeds |μ| (a signal-to-noise ratio below 1; Blundell et al. 2015). Tells whether
    training moved the variances from their initial value and how much of the network the
    posterior leaves uncertain."""
    log_var = np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(guide.log_var)])
    loc = np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(guide.loc)])
    log_var, loc = log_var.astype(np.float64), loc.astype(np.float64)
    p5, median, p95 = np.quantile(log_var, (0.05, 0.5, 0.95))
    return {
        "weights": int(log_var.size),
        "log_var_p5": float(p5),
        "log_var_median": float(median),
        "log_var_p95": float(p95),
        "sigma_above_abs_mu": float(np.mean(np.exp(0.5 * log_var) > np.abs(loc))),
    }
