"""Training: immutable state, optimiser, the jitted step, and the whole training loop."""

from vi_seg_jax.methods import MethodConfig
from vi_seg_jax.train.config import BackboneConfig, DataConfig, ScheduleConfig, TrainConfig
from vi_seg_jax.train.state import (
    ModelSpec,
    OptimConfig,
    TrainState,
    create_train_state,
    make_optimizer,
)
from vi_seg_jax.train.step import make_train_step, train_step

__all__ = [
    "BackboneConfig",
    "DataConfig",
    "MethodConfig",
    "ModelSpec",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "TrainState",
    "create_train_state",
    "make_optimizer",
    "make_train_step",
    "train_step",
]
