"""`materialize`: arrays XLA must write out where they are computed.

What a backward pass keeps is decided by XLA, not by the residuals a `custom_vjp` returns:
an elementwise residual is fused into its consumer in the backward pass, so its operands
stay alive instead (for the LRT's `noise / (2 std)`: the noise's bits, two stages of its
inverse CDF and `std`), and a recomputation in the backward pass is merged with the forward
one by CSE, so the forward's array is kept after all. `lax.optimization_barrier` prevents
both on GPU and TPU, but XLA:CPU removes barriers before it fuses. On CPU the arrays pass
instead through a custom call that XLA cannot see into: a no-op whose outputs alias its
inputs, so nothing is copied.
"""

from __future__ import annotations

import functools

import jax
from jax import lax

from vi_seg_jax.ops import ffi_handler, partitioning


def materialize(tree, *, after=None):
    """The arrays of `tree`, unchanged, as values XLA computes here and cannot look through
    (no fusion into later consumers, no CSE with equal expressions).

    `after`: arrays that must be computed first, so that work on the result is not hoisted
    to an earlier point of the program (where its result would be kept longer). Not
    differentiable: use it inside a `custom_vjp`'s rules.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if not leaves:
        return tree
    # One element of each is enough to order the work, and cheaper to keep.
    dependencies = [d[(0,) * d.ndim] for d in jax.tree_util.tree_leaves(after)]
    leaves = lax.platform_dependent(
        *leaves,
        *dependencies,
        cpu=_opaque_identity(len(leaves)),
        default=lambda *operands: lax.optimization_barrier(operands)[: len(leaves)],
    )
    return jax.tree_util.tree_unflatten(treedef, list(leaves))


@functools.cache
def _opaque_identity(count: int):
    """`(*operands) -> the first count operands`, aliased (XLA copies one that is still used
    elsewhere); over a device mesh each device passes its own shards through."""

    def local(*operands):
        call = jax.ffi.ffi_call(
            _identity_target(),
            tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in operands[:count]),
            input_output_aliases={i: i for i in range(count)},
        )
        return call(*operands)

    return partitioning.elementwise(local, count)


@functools.cache
def _identity_target() -> str:
    # Outputs alias inputs: the data is already where it must be.
    return ffi_handler.register("vi_seg_jax_materialize", lambda inputs, outputs: None)
