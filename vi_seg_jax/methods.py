"""Training methods: how each treats the network's weights, decided once.

A run's `MethodConfig` names a method; `resolve_method(config)` turns it into a `Method`
object, the only place the name is looked at. Everything that differs between methods is a
method of that object:

| | `vi` | `deterministic` | `mc_dropout` | `ensemble` |
|---|---|---|---|---|
| state | plain weights + q(w) over the kernels | weights | weights | K stacked members |
| regulariser | β_t · KL(q ‖ p) | −log p(w) (MAP) | −log p(w) | −log p(w), per member |
| a training forward pass | LRT or one weight draw | plain | dropout on | plain, per member |
| a posterior sample | one weight draw | the network | one dropout mask | member t mod K |
| default samples | as asked | 1 | as asked | K |

Adding a method: subclass `Method`, implement its hooks, add it to `METHODS` (see
docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp

from vi_seg_jax.bayes.elbo import kl_scale
from vi_seg_jax.bayes.guide import (
    GuideConfig,
    GuideParams,
    bayesian_paths,
    init_guide,
    sample_kernels,
    split_params,
)
from vi_seg_jax.bayes.layers import apply_backbone, apply_lrt, apply_sampled


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Which way the weights are treated.

    Attributes:
      method: a name in `METHODS`: `vi` (mean-field Gaussian posterior over the 3×3(×3)
        kernels), `deterministic` (MAP: L2 penalty = N(0, prior_scale²) prior on the same
        kernels), `mc_dropout` (the deterministic network with dropout kept on at
        prediction) or `ensemble` (`ensemble_size` deterministic members trained in one
        vmapped step).
      estimator: `lrt` (local reparameterisation, training default) or `full` (one
        weight draw per particle).
      num_particles: Monte Carlo samples of the data term per step (vmapped).
      prior_scale: σ of the N(0, σ²) prior (and of the MAP L2 penalty).
      guide: initialisation of q(w).
      ensemble_size: members of the deep ensemble.
    """

    method: str = "vi"
    estimator: Literal["lrt", "full"] = "lrt"
    num_particles: int = 1
    prior_scale: float = 1.0
    guide: GuideConfig = GuideConfig()
    ensemble_size: int = 5

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        if self.estimator not in ("lrt", "full"):
            raise ValueError(f"estimator must be 'lrt' or 'full', got {self.estimator!r}")
        if self.num_particles < 1:
            raise ValueError(f"num_particles must be >= 1, got {self.num_particles}")
        if self.ensemble_size < 1:
            raise ValueError(f"ensemble_size must be >= 1, got {self.ensemble_size}")


@dataclasses.dataclass(frozen=True)
class Method:
    """The behaviour of one method (a subclass per method; `resolve_method` picks it).

    Hooks take the pieces they need (backbone, parameters, keys), not the train state, so
    that this module sits below `train/`.
    """

    config: MethodConfig

    # q(w) over the kernels is trained (the run's state holds a guide).
    has_guide: ClassVar[bool] = False
    # Dropout must be on in the backbone: without it every sample is the same network.
    needs_dropout: ClassVar[bool] = False
    # The dropout a config gets when it switches to this method (`TrainConfig.with_method`).
    default_dropout_rate: ClassVar[float] = 0.0
    # Posterior samples carry their own kernels; vmapping them needs batched-kernel convs.
    samples_own_kernels: ClassVar[bool] = False

    def check(self, dropout_rate: float) -> None:
        """Rules across config sections (raises ValueError with the fix)."""
        if self.needs_dropout and dropout_rate <= 0:
            raise ValueError(
                f"`method.method` {self.config.method} needs `backbone.dropout_rate` > 0 "
                f"(its default is {self.default_dropout_rate})"
            )

    def default_samples(self, requested: int) -> int:
        """Monte Carlo samples of the predictive when `requested` are asked for."""
        return requested

    def init(self, key: jax.Array, guide_key: jax.Array, init_params: Callable, prior):
        """(params, guide, prior_params) of a new run; `init_params(key)` inits the network."""
        return init_params(key), None, None

    def init_optimizer(self, optimizer, trainable: dict):
        """The optimiser state of the trainable tree (of each member)."""
        return optimizer.init(trainable)

    def vmaps_training_kernels(self) -> bool:
        """Whether a training step vmaps over per-particle or per-member kernels."""
        return False

    def training_logits(self, backbone, params, guide, images, key, dropout_key, cast):
        """Logits of one particle of the data term; `cast` puts arrays in compute precision."""
        return apply_backbone(backbone, params, images, train=True, dropout_key=dropout_key)[0]

    def regulariser(self, prior, trainable: dict, key, step, objective) -> tuple[Any, Any]:
        """(KL or penalty, its weight β_t) added to the data term."""
        kernels, _ = split_params(trainable["params"], bayesian_paths(trainable["params"]))
        return prior.neg_log_prob(kernels), jnp.ones((), jnp.float32)  # MAP: −log p(w)

    def over_members(self, update: Callable, trainable: dict, opt_state, key):
        """`update(trainable, opt_state, key) -> (trainable, opt_state, metrics)` applied to
        the model, or to each member with its own key (metrics averaged)."""
        return update(trainable, opt_state, key)

    def sample_logits(self, backbone, params, guide, index, key, images):
        """Logits of posterior sample `index` (drawn with `key`)."""
        return apply_backbone(backbone, params, images, train=False)[0]


class Deterministic(Method):
    def default_samples(self, requested: int) -> int:
        return 1


class MCDropout(Method):
    needs_dropout = True
    default_dropout_rate = 0.1

    def sample_logits(self, backbone, params, guide, index, key, images):
        return apply_backbone(backbone, params, images, train=True, dropout_key=key)[0]


class Ensemble(Method):
    samples_own_kernels = True

    def default_samples(self, requested: int) -> int:
        return self.config.ensemble_size

    def init(self, key, guide_key, init_params, prior):
        return jax.vmap(init_params)(jax.random.split(key, self.config.ensemble_size)), None, None

    def init_optimizer(self, optimizer, trainable):
        return jax.vmap(optimizer.init)(trainable)

    def vmaps_training_kernels(self) -> bool:
        return True

    def over_members(self, update, trainable, opt_state, key):
        keys = jax.random.split(key, self.config.ensemble_size)
        trainable, opt_state, metrics = jax.vmap(update)(trainable, opt_state, keys)
        return trainable, opt_state, jax.tree_util.tree_map(jnp.mean, metrics)

    def sample_logits(self, backbone, params, guide, index, key, images):
        member = jax.tree_util.tree_map(
            lambda leaf: jax.lax.dynamic_index_in_dim(
                leaf, index % self.config.ensemble_size, keepdims=False
            ),
            params,
        )
        return apply_backbone(backbone, member, images, train=False)[0]


class VariationalInference(Method):
    has_guide = True
    samples_own_kernels = True

    def init(self, key, guide_key, init_params, prior):
        params = init_params(key)
        kernels, params = split_params(params, bayesian_paths(params))
        return params, init_guide(guide_key, kernels, self.config.guide), prior.init_params()

    def vmaps_training_kernels(self) -> bool:
        return self.config.estimator == "full" and self.config.num_particles > 1

    def training_logits(self, backbone, params, guide: GuideParams, images, key, dropout_key, cast):
        if self.config.estimator == "lrt":
            logits, _ = apply_lrt(
                backbone, params, cast(guide), images, key=key, train=True, dropout_key=dropout_key
            )
            return logits
        kernels = cast(sample_kernels(key, guide))
        return apply_sampled(
            backbone, params, kernels, images, train=True, dropout_key=dropout_key
        )[0]

    def regulariser(self, prior, trainable, key, step, objective):
        return prior.kl(trainable["guide"], key, trainable["prior"]), kl_scale(step, objective)

    def sample_logits(self, backbone, params, guide, index, key, images):
        return apply_sampled(backbone, params, sample_kernels(key, guide), images)[0]


METHODS: dict[str, type[Method]] = {
    "vi": VariationalInference,
    "deterministic": Deterministic,
    "mc_dropout": MCDropout,
    "ensemble": Ensemble,
}


def resolve_method(config: MethodConfig) -> Method:
    """The `Method` that `config.method` names."""
    return METHODS[config.method](config)
