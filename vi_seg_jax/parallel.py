"""Data parallelism over a device mesh, and JAX's multi-controller runtime.

One `jax.sharding.Mesh` with a single `data` axis spans the devices a run uses. Training
shards the batch along it and replicates parameters and optimiser state (the models here
are a few million weights; replicas fit any accelerator, so nothing is sharded by size).
Monte Carlo prediction spreads the posterior samples along the same axis.

Randomness does not depend on the device count: keys are split inside one global-view
`jit`, and each device draws exactly its slice of the noise a single device would draw for
the whole batch: JAX's partitionable threefry (`jax_threefry_partitionable`, on by default)
for `jax.random`, and for the LRT's noise XLA's generator started at the device's first row
(`ops.partitioning`, which also runs the CPU's custom calls on each device's rows, so no
device computes the whole batch). Batch b is one draw of patches
whose rows are assigned to processes by the mesh; each process reads only its rows'
patches from the memory-mapped cache. So 1, 2 or 8 devices, in one process or several,
train the same model up to the order of floating-point reductions (tested).

Multi-host: `initialize_distributed` calls `jax.distributed.initialize` (TPU pods, SLURM
and Open MPI are detected by JAX; elsewhere pass the coordinator, process count and
index); every process then runs the same program on its own devices.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-process run (all None and `auto` False: it does not).

    Attributes:
      auto: let JAX detect the cluster (Cloud TPU pod slice, SLURM, Open MPI).
      coordinator_address: `host:port` of process 0 (multi-node GPU without a scheduler,
        or two processes on one machine).
      num_processes: processes in all.
      process_id: this process's index in [0, num_processes).
    """

    auto: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    @property
    def enabled(self) -> bool:
        return self.auto or self.coordinator_address is not None


def initialize_distributed(config: DistributedConfig) -> None:
    """Joins the multi-process run described by `config`; a no-op when it is not enabled.

    Must run before any other JAX call of the process.
    """
    if not config.enabled:
        if config.num_processes is not None or config.process_id is not None:
            raise ValueError(
                "--num-processes and --process-id need --coordinator-address or --distributed"
            )
        return
    explicit = (config.coordinator_address, config.num_processes, config.process_id)
    if config.coordinator_address is not None and None in explicit:
        raise ValueError("--coordinator-address needs --num-processes and --process-id as well")
    if (
        config.num_processes is not None
        and not 0 <= (config.process_id or 0) < config.num_processes
    ):
        raise ValueError(
            f"--process-id must be in [0, {config.num_processes}), got {config.process_id}"
        )
    jax.distributed.initialize(
        coordinator_address=config.coordinator_address,
        num_processes=config.num_processes,
        process_id=config.process_id,
    )


def is_primary() -> bool:
    """Whether this process writes logs, summaries and figures (process 0)."""
    return jax.process_index() == 0


def data_mesh(num_devices: int | None = None, *, batch_size: int | None = None) -> Mesh:
    """A 1D mesh with axis `data`.

    Args:
      num_devices: devices to use; None takes all of them, or in one process the most
        that divide `batch_size` evenly.
      batch_size: the global batch, which must split evenly over the devices.

    Raises:
      ValueError: more devices than there are, or a batch that does not split evenly.
    """
    available = jax.device_count()
    multi_process = jax.process_count() > 1
    if num_devices is None:
        num_devices = available
        if batch_size is not None and not multi_process:
            num_devices = max(n for n in range(1, available + 1) if batch_size % n == 0)
    if not 1 <= num_devices <= available:
        raise ValueError(f"--devices {num_devices}: {available} device(s) available")
    if multi_process and num_devices != available:
        raise ValueError(
            f"--devices {num_devices}: a multi-process run uses all {available} devices"
        )
    if batch_size is not None and batch_size % num_devices:
        raise ValueError(
            f"--batch-size {batch_size} does not split over {num_devices} devices; "
            "use a multiple of the device count or set --devices"
        )
    # Auto axes: XLA's sharding propagation partitions the step from the batch's sharding
    # (the backbones need no sharding annotations).
    return jax.make_mesh(
        (num_devices,),
        (DATA_AXIS,),
        axis_types=(jax.sharding.AxisType.Auto,),
        devices=jax.devices()[:num_devices],
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """The same full array on every device of `mesh`."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch or sample) axis split along `data`."""
    return NamedSharding(mesh, P(DATA_AXIS))


def process_rows(mesh: Mesh, batch_size: int) -> slice:
    """The rows of a global batch that this process's devices hold."""
    indices = batch_sharded(mesh).addressable_devices_indices_map((batch_size,))
    starts = [index[0].start or 0 for index in indices.values()]
    stops = [batch_size if index[0].stop is None else index[0].stop for index in indices.values()]
    rows = slice(min(starts), max(stops))
    if rows.stop - rows.start != sum(b - a for a, b in zip(starts, stops, strict=True)):
        raise ValueError("this process's devices do not hold contiguous rows of the batch")
    return rows


def global_batch(mesh: Mesh, local_arrays: tuple[np.ndarray, ...], batch_size: int):
    """Global arrays sharded along `data` from this process's rows (`process_rows`)."""
    sharding = batch_sharded(mesh)
    return tuple(
        jax.make_array_from_process_local_data(sharding, local, (batch_size, *local.shape[1:]))
        for local in local_arrays
    )
