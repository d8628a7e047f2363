"""Custom calls that XLA's SPMD partitioner runs on each device's shard.

XLA cannot see into a custom call (oneDNN's convolutions, `materialize`'s no-op) nor split
`RngBitGenerator` along a sharded axis, so over a device mesh it gathers their operands and
runs them whole on every device: a data-parallel step then does the whole batch's work on
each device. `jax.experimental.custom_partitioning` tells the partitioner how they split:

- `rowwise`: an op whose batched operands and result share a leading (batch) axis, rows
  independent, or whose result sums over that axis (a conv's kernel gradient: each device
  sums its rows, then one all-reduce). Everything but the batch axis stays whole.
- `elementwise`: an op that maps each operand to a result of the same shape and sharding.

On one device, and inside `shard_map` (where arrays are already per device), the op runs as
written. `custom_partitioning` has no batching rule, so `vmap` goes around the wrapped op:
`rowwise` ops run once per vmapped element (`lax.map`), `elementwise` ones on the batched
arrays as they are.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence

import jax
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

_BATCH = "batch"


@dataclasses.dataclass(frozen=True)
class Rows:
    """The rows of the global batch that one device's call of a `rowwise` op works on.

    Attributes:
      start: the first row's index in the global batch (traced).
      count: rows on this device.
      total: rows in the global batch.
    """

    start: jax.Array
    count: int
    total: int


def rowwise(
    local: Callable[..., jax.Array],
    operand_rows: Sequence[bool],
    *,
    summed: bool = False,
) -> Callable[..., jax.Array]:
    """`local` as an op that each device runs on its own rows of the batch.

    Args:
      local: `(*operands, rows) -> result`: operands flagged in `operand_rows` and the
        result (unless `summed`) have the rows as leading axis. `rows` is None for the
        whole batch, or the `Rows` of one device's share.
      operand_rows: which operands carry the batch axis.
      summed: the result is a sum over the rows (no batch axis); devices add their parts.

    Returns:
      `op(*operands)`, equal to `local(*operands, rows=None)`.
    """
    operand_rows = tuple(operand_rows)
    if summed and not any(operand_rows):
        raise ValueError("a summed rowwise op needs an operand with the batch axis")

    @custom_partitioning
    def op(*operands):
        return local(*operands, rows=None)

    def partition(mesh, operand_shapes, result_shape):
        with_rows = [s for s, rows in zip(operand_shapes, operand_rows, strict=True) if rows]
        total = int((with_rows or [result_shape])[0].shape[0])
        axes = _batch_axes(mesh, operand_shapes, operand_rows, result_shape, summed, total)
        row_spec, whole = NamedSharding(mesh, P(axes)), NamedSharding(mesh, P())
        operand_shardings = tuple(row_spec if rows else whole for rows in operand_rows)

        def on_device(*operands):
            if axes is None:
                return local(*operands, rows=None)
            count = total // _axes_size(mesh, axes)
            rows = Rows(lax.axis_index(axes) * count, count, total)
            result = local(*operands, rows=rows)
            return lax.psum(result, axes) if summed else result

        return mesh, on_device, whole if summed else row_spec, operand_shardings

    op.def_partition(
        partition=partition,
        sharding_rule=lambda mesh, operand_types, result_types: _rowwise_rule(
            operand_types, operand_rows, result_types, summed
        ),
    )
    return jax.custom_batching.sequential_vmap(op)


def elementwise(local: Callable[..., tuple], outputs: int) -> Callable[..., tuple]:
    """`local(*operands)`, returning the first `outputs` operands' shapes and dtypes, as an
    op that each device runs on its own shards (further operands are ordering dependencies
    and may have any shape)."""

    @custom_partitioning
    def op(*operands):
        return local(*operands)

    def partition(mesh, operand_shapes, result_shapes):
        shardings = tuple(shape.sharding for shape in operand_shapes)
        return mesh, local, shardings[:outputs], shardings

    def rule(mesh, operand_types, result_types):
        names = [
            [f"d{i}_{axis}" for axis in range(len(t.shape))] for i, t in enumerate(operand_types)
        ]
        inputs = ", ".join(" ".join(n) for n in names)
        return f"{inputs} -> " + ", ".join(" ".join(n) for n in names[:outputs])

    op.def_partition(partition=partition, sharding_rule=rule)

    @jax.custom_batching.custom_vmap
    def batched_op(*operands):
        return op(*operands)

    @batched_op.def_vmap
    def _(axis_size, in_batched, *operands):
        del axis_size
        return op(*operands), tuple(in_batched[:outputs])

    return batched_op


def _batch_axes(mesh, operand_shapes, operand_rows, result_shape, summed, total):
    """The mesh axes the batch axis is split along (None: not split, or not evenly)."""
    candidates = [s for s, rows in zip(operand_shapes, operand_rows, strict=True) if rows]
    if not summed:
        candidates.append(result_shape)
    for shape in candidates:
        spec = shape.sharding.spec
        axes = spec[0] if len(spec) else None
        if axes is not None and total % _axes_size(mesh, axes) == 0:
            return axes
    return None


def _axes_size(mesh, axes) -> int:
    names = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh.shape[name] for name in names)


def _rowwise_rule(operand_types, operand_rows, result_types, summed):
    """Shardy's rule: the batch factor may be split, every other dimension stays whole."""
    factors = (f"f{i}" for i in itertools.count())
    whole: list[str] = []

    def dims(rank: int, rows: bool) -> str:
        names = [next(factors) for _ in range(rank - rows)]
        whole.extend(names)
        return " ".join([_BATCH] * rows + names)

    operands = [
        dims(len(t.shape), rows) for t, rows in zip(operand_types, operand_rows, strict=True)
    ]
    (result_type,) = result_types
    result = dims(len(result_type.shape), not summed)
    options = {"need_replication_factors": tuple(whole)}
    if summed:
        options["reduction_factors"] = (_BATCH,)
    return f"{', '.join(operands)} -> {result}", options
