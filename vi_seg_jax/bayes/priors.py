"""Priors p(w) over the Bayesian kernels, behind one interface.

A prior gives `kl(guide, key, params)`: KL(q‖p) or an upper bound on it, where `params` are
the prior's own parameters trained jointly with q (`init_params()`; None for a fixed prior).
The N(0, σ²) prior is in closed form; the deep weight prior (a kernel VAE) plugs in through
the same methods, so neither the guide nor the backbones change when the prior does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro.distributions.kl import kl_divergence

from vi_seg_jax.bayes.guide import GuideParams


class Prior(Protocol):
    def kl(self, guide: GuideParams, key: jax.Array | None = None, params: Any = None) -> jax.Array:
        """KL(q‖p) summed over every Bayesian weight (or an upper bound on it), a scalar.

        `params`: the prior's own trainable parameters (from `init_params`), if it has any.
        """
        ...

    def init_params(self) -> Any:
        """Parameters trained jointly with q (kept in the train state), or None."""
        ...

    def neg_log_prob(self, kernels) -> jax.Array:
        """−log p(w) of point kernels (the MAP methods' penalty), a scalar."""
        ...


@dataclasses.dataclass(frozen=True)
class NormalPrior:
    """w ~ N(0, scale²) independently; the paper's prior is N(0, 1).

    KL(N(μ, σ²) ‖ N(0, s²)) = log(s/σ) + (σ² + μ²)/(2s²) − 1/2, per weight.
    """

    scale: float = 1.0

    def kl(self, guide: GuideParams, key: jax.Array | None = None, params: Any = None) -> jax.Array:
        del key, params  # closed form, nothing trained
        terms = jax.tree_util.tree_map(
            lambda loc, scale: jnp.sum(
                kl_divergence(dist.Normal(loc, scale), dist.Normal(0.0, self.scale))
            ),
            guide.loc,
            guide.scale(),
        )
        return sum(jax.tree_util.tree_leaves(terms), jnp.zeros((), jnp.float32))

    def init_params(self) -> None:
        return None

    def neg_log_prob(self, kernels) -> jax.Array:
        """−log p(w) up to a constant: the L2 penalty Σ w²/(2s²) of MAP training."""
        squares = [jnp.sum(jnp.square(w)) for w in jax.tree_util.tree_leaves(kernels)]
        return sum(squares, jnp.zeros((), jnp.float32)) / (2.0 * self.scale**2)
