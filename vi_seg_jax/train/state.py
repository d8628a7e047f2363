"""The immutable train state, the optimiser, and what a training method is made of."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import flax.linen as nn
import jax
import optax
from flax import struct

from vi_seg_jax.bayes.elbo import ObjectiveConfig
from vi_seg_jax.bayes.guide import GuideParams
from vi_seg_jax.bayes.priors import NormalPrior, Prior
from vi_seg_jax.data.augment import AugmentConfig
from vi_seg_jax.methods import Method, MethodConfig, resolve_method
from vi_seg_jax.ops.conv3d import ConvEngine


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Adam with step decay (the paper code: lr 1e-3, ×0.5 every 50 epochs).

    Attributes:
      learning_rate: initial Adam step size.
      decay_every_steps: multiply the rate by `decay_factor` every this many steps
        (50 epochs × steps per epoch for the paper); 0 keeps it constant.
      decay_factor: the step decay's factor.
      clip_norm: clip gradients to this global norm first; None disables clipping.
      frozen: names of layers (top-level modules, e.g. `"down_3"`) whose parameters are
        never updated (fine-tuning with frozen layers).

    The optimiser updates the trainable tree `{"params", "guide", "prior"}` (network,
    posterior, the prior's own parameters when it trains any).
    """

    learning_rate: float = 1e-3
    decay_every_steps: int = 0
    decay_factor: float = 0.5
    clip_norm: float | None = None
    frozen: tuple[str, ...] = ()


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
    """The one place the optimiser is built."""
    schedule = (
        optax.exponential_decay(
            config.learning_rate,
            transition_steps=config.decay_every_steps,
            decay_rate=config.decay_factor,
            staircase=True,
        )
        if config.decay_every_steps > 0
        else config.learning_rate
    )
    parts = [optax.adam(schedule)]
    if config.clip_norm is not None:
        parts.insert(0, optax.clip_by_global_norm(config.clip_norm))
    if config.frozen:
        frozen = set(config.frozen)

        def is_frozen(tree):
            # Only the network's layers: a prior's parameters may share a layer's name.
            return jax.tree_util.tree_map_with_path(
                lambda path, _: (
                    path[0].key != "prior" and any(getattr(k, "key", None) in frozen for k in path)
                ),
                tree,
            )

        parts.append(optax.masked(optax.set_to_zero(), is_frozen))
    return parts[0] if len(parts) == 1 else optax.chain(*parts)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything static about a training run: hashable, closed over by `jax.jit`."""

    backbone: nn.Module
    method: MethodConfig = MethodConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    optim: OptimConfig = OptimConfig()
    prior: Prior = NormalPrior()
    precision: Literal["fp32", "bf16"] = "fp32"  # of the data term's forward/backward pass
    augment: AugmentConfig | None = None  # applied to each training batch on the device

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")

    @property
    def optimizer(self) -> optax.GradientTransformation:
        return make_optimizer(self.optim)

    @functools.cached_property
    def strategy(self) -> Method:
        """The `Method` that `method` names: what differs between methods is asked of it."""
        return resolve_method(self.method)

    def for_batched_kernels(self) -> ModelSpec:
        """This spec for a function that vmaps over per-sample kernels (particles, ensemble
        members, Monte Carlo samples): GEMM convolutions, which become batched GEMMs there,
        where XLA turns the other formulations into much slower grouped convs. A formulation
        the backbone forces is kept."""
        conv = getattr(self.backbone, "conv", None)
        if conv is None or conv.impl != "auto":
            return self
        return dataclasses.replace(self, backbone=self.backbone.clone(conv=ConvEngine("gemm")))


@struct.dataclass
class TrainState:
    """Immutable training state; `train_step` returns a new one."""

    step: jax.Array  # [] int32
    params: dict  # deterministic params ([K, ...] stacked for an ensemble)
    guide: GuideParams | None  # q(w) for `vi`, None otherwise
    opt_state: optax.OptState
    key: jax.Array  # typed key, split once per step
    prior_params: Any = None  # the prior's trained parameters (DWP encoders), or None


def create_train_state(
    key: jax.Array, spec: ModelSpec, sample_images: jax.Array, sharding=None
) -> TrainState:
    """Initial state. `sample_images` [B, *S, C] fixes the input shape (values unused).

    `sharding`: where the state's arrays live (e.g. replicated over a mesh); None: the
    default device.
    """
    # One compiled initialisation instead of hundreds of small eager operations.
    init = functools.partial(_initial_state, spec=spec)
    return jax.jit(init, out_shardings=sharding)(key, sample_images)


def _initial_state(key: jax.Array, sample_images: jax.Array, *, spec: ModelSpec) -> TrainState:
    init_key, guide_key, state_key = jax.random.split(key, 3)

    def init_params(k):
        return spec.backbone.init({"params": k}, sample_images, train=False)["params"]

    params, guide, prior_params = spec.strategy.init(init_key, guide_key, init_params, spec.prior)
    trainable = trainable_tree(params, guide, prior_params)
    opt_state = spec.strategy.init_optimizer(spec.optimizer, trainable)
    return TrainState(
        step=jax.numpy.zeros((), jax.numpy.int32),
        params=params,
        guide=guide,
        opt_state=opt_state,
        key=state_key,
        prior_params=prior_params,
    )


def trainable_tree(params, guide: GuideParams | None, prior_params) -> dict:
    """The tree the optimiser updates (see `OptimConfig`)."""
    return {"params": params, "guide": guide, "prior": prior_params}
