"""The pure training step: `train_step(state, batch) -> (state, metrics)`.

`make_train_step(spec, mesh)` jits it with the state donated; over a device mesh the batch
is sharded along `data` and the state replicated (`vi_seg_jax.parallel`). Particles are
vmapped; the ensemble's members are vmapped over their stacked parameters and optimiser
states, so the K members train in one step on the same batch with their own keys.

Mixed precision (`spec.precision == "bf16"`): the forward and backward passes of the data
term run in bfloat16 on bfloat16 copies of the weights and images; the float32 weights, the
optimiser state, the KL term, the loss and every reduction over the batch stay float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from vi_seg_jax.bayes.elbo import hard_dice, scaled_data_term
from vi_seg_jax.data.augment import augment_batch
from vi_seg_jax.parallel import batch_sharded, replicated
from vi_seg_jax.train.state import ModelSpec, TrainState, trainable_tree


def _compute_dtype(tree, spec: ModelSpec):
    """`tree`'s floating-point leaves in the compute precision (a no-op for fp32)."""
    if spec.precision == "fp32":
        return tree
    return jax.tree_util.tree_map(
        lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def _particle_data_terms(trainable, images, labels, weights, key, spec: ModelSpec):
    """Data term per particle [P] and the first particle's logits."""
    params, guide = _compute_dtype(trainable["params"], spec), trainable["guide"]
    images = _compute_dtype(images, spec)

    def one(particle_key):
        noise_key, dropout_key = jax.random.split(particle_key)
        logits = spec.strategy.training_logits(
            spec.backbone,
            params,
            guide,
            images,
            noise_key,
            dropout_key,
            lambda tree: _compute_dtype(tree, spec),
        ).astype(jnp.float32)
        return scaled_data_term(logits, labels, spec.objective, weights), logits

    data, logits = jax.vmap(one)(jax.random.split(key, spec.method.num_particles))
    return data, logits[0]


def loss_fn(trainable, images, labels, key, step, spec: ModelSpec, weights=None):
    """Negative ELBO (vi) or penalised loss (MAP methods), with metrics.

    `weights`: the sampler's unbiased voxel weights [B, *S], or None (`bayes.elbo`).
    """
    data_key, kl_key = jax.random.split(key)
    data, logits = _particle_data_terms(trainable, images, labels, weights, data_key, spec)
    data = jnp.mean(data)
    kl, beta = spec.strategy.regulariser(spec.prior, trainable, kl_key, step, spec.objective)
    loss = data + beta * kl
    metrics = {
        "loss": loss,
        "data": data,
        "kl": kl,
        "kl_weight": beta,
        "dice": hard_dice(logits, labels, spec.objective.likelihood.task),
    }
    return loss, metrics


def _update(trainable, opt_state, batch, key, step, spec: ModelSpec):
    images, labels, *weights = batch  # the weights are optional
    grads, metrics = jax.grad(loss_fn, has_aux=True)(
        trainable, images, labels, key, step, spec, *weights
    )
    updates, opt_state = spec.optimizer.update(grads, opt_state, trainable)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return optax.apply_updates(trainable, updates), opt_state, metrics


def train_step(state: TrainState, batch, *, spec: ModelSpec) -> tuple[TrainState, dict]:
    """One optimisation step.

    Args:
      state: the current state.
      batch: `(images [B, *S, C] float32, labels [B, *S] canonical classes)`, optionally
        with the sampler's unbiased voxel weights `[B, *S]` float32 as a third element;
        augmented here, on the device, when `spec.augment` is set.
      spec: the static description of the model and method.

    Returns:
      The next state and scalar metrics: loss, data, kl, kl_weight, dice, grad_norm.
    """
    next_key, step_key = jax.random.split(state.key)
    if spec.augment is not None:  # without augmentation the keys are as they always were
        step_key, augment_key = jax.random.split(step_key)
        batch = augment_batch(augment_key, *batch[:2], spec.augment, *batch[2:])

    def update(trainable, opt_state, key):
        return _update(trainable, opt_state, batch, key, state.step, spec)

    updated, opt_state, metrics = spec.strategy.over_members(
        update,
        trainable_tree(state.params, state.guide, state.prior_params),
        state.opt_state,
        step_key,
    )
    params, guide, prior_params = updated["params"], updated["guide"], updated["prior"]
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        guide=guide,
        opt_state=opt_state,
        key=next_key,
        prior_params=prior_params,
    )
    return new_state, metrics


def make_train_step(spec: ModelSpec, mesh: Mesh | None = None):
    """`train_step` for `spec`, jitted, with the incoming state's buffers donated.

    With `mesh`, the batch is sharded along its `data` axis and state and metrics are
    replicated; XLA inserts the gradient all-reduce.
    """

    if spec.strategy.vmaps_training_kernels():
        spec = spec.for_batched_kernels()

    def step(state: TrainState, batch) -> tuple[TrainState, dict]:
        return train_step(state, batch, spec=spec)

    if mesh is None:
        return jax.jit(step, donate_argnums=(0,))
    shared, split = replicated(mesh), batch_sharded(mesh)
    return jax.jit(
        step,
        in_shardings=(shared, split),
        out_shardings=(shared, shared),
        donate_argnums=(0,),
    )
