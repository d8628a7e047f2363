"""Orbax checkpoints of the whole training state.

A checkpoint holds two items: `state`, the `TrainState` pytree (guide and deterministic
parameters, optimiser state, step, key, a prior's trained parameters) saved with
`PyTreeSave` (array files and JSON metadata; nothing is pickled, so restoring never
executes code), and `meta`, a JSON document with the run's configuration, the data
sampler's position and the metrics of that step. Orbax writes each step under a temporary name and renames it when complete, so
a run killed mid-write leaves the previous checkpoints intact. The manager keeps the
last `keep_last` steps plus the best by validation Dice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from vi_seg_jax.errors import DataError, first_line
from vi_seg_jax.train.state import TrainState

BEST_METRIC = "val_dice"


def checkpoint_manager(directory: str | Path, *, keep_last: int = 3) -> ocp.CheckpointManager:
    """A manager writing synchronously (a returned `save` is on disk) into `directory`."""
    policy = checkpoint_managers.AnyPreservationPolicy(
        [
            checkpoint_managers.LatestN(n=keep_last),
            checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics[BEST_METRIC],
                n=1,
                keep_checkpoints_without_metrics=False,
            ),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        enable_async_checkpointing=False,
        create=True,
    )
    return ocp.CheckpointManager(
        Path(directory).absolute(), options=options, item_names=("state", "meta")
    )


def _saveable(state: TrainState) -> TrainState:
    # Typed keys are stored as their raw key data and re-wrapped on restore.
    return state.replace(key=jax.random.key_data(state.key))


def save_checkpoint(
    manager: ocp.CheckpointManager,
    state: TrainState,
    meta: dict[str, Any],
    *,
    metrics: dict[str, float] | None = None,
) -> None:
    """Saves `state` and `meta` at `state.step` (metrics feed the best-checkpoint policy)."""
    step = int(state.step)
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(_saveable(state)),
            meta=ocp.args.JsonSave(meta),
        ),
        metrics=metrics,
        force=True,
    )
    manager.wait_until_finished()


def read_meta(manager: ocp.CheckpointManager, step: int | None = None) -> dict[str, Any]:
    """The JSON part of a checkpoint (latest step when `step` is None)."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise DataError(manager.directory, "no checkpoint found")
    restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored["meta"]


def restore_checkpoint(
    manager: ocp.CheckpointManager,
    like: TrainState,
    step: int | None = None,
    *,
    sharding: jax.sharding.Sharding | None = None,
) -> tuple[TrainState, dict[str, Any]]:
    """Restores the state at `step` (latest when None) into the structure of `like`.

    `like` may be a concrete state or `jax.eval_shape` of one; shapes and dtypes must match,
    so a checkpoint of another backbone or configuration fails here. `sharding`: where
    every restored array goes (e.g. replicated over the run's mesh; each process of a
    multi-process run reads what its devices hold); None: this process's first device.
    The checkpoint may hold more than `like`: prediction leaves out a trained prior's
    parameters, and a run resumes a checkpoint written before a field (None when unused)
    was added to the state. Every array `like` holds must be in it.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise DataError(manager.directory, "no checkpoint found")
    # An explicit target sharding: a checkpoint written on N devices restores on any count.
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree_util.tree_map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        _saveable_abstract(like),
    )
    state_args = ocp.args.PyTreeRestore(
        abstract,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True,
    )
    where = Path(manager.directory) / str(step)
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore())
        )
    except TypeError as error:  # Orbax: the checkpoint has None where `like` has arrays
        raise DataError(where, f"does not hold this run's state ({first_line(error)})") from None
    state = restored["state"]
    missing = [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_leaves_with_path(state)
        if isinstance(leaf, jax.ShapeDtypeStruct)  # what a partial restore did not find
    ]
    if missing:
        raise DataError(where, f"holds no {', '.join(missing[:3])}")
    return state.replace(key=jax.random.wrap_key_data(state.key)), restored["meta"]


def _saveable_abstract(like: TrainState) -> TrainState:
    return jax.eval_shape(_saveable, like)
