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

from vi_seg_jax.bayes.elbo import hard_dice, kl_scale, scaled_data_term
from vi_seg_jax.bayes.guide import bayesian_paths, sample_kernels, split_params
from vi_seg_jax.bayes.layers import apply_backbone, apply_lrt, apply_sampled
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
        if guide is None:
            logits, _ = apply_backbone(
                spec.backbone, params, images, train=True, dropout_key=dropout_key
            )
        elif spec.method.estimator == "lrt":
            logits, _ = apply_lrt(
                spec.backbone,
                params,
                _compute_dtype(guide, spec),
                images,
                key=noise_key,
                train=True,
                dropout_key=dropout_key,
            )
        else:
            kernels = _compute_dtype(sample_kernels(noise_key, guide), spec)
            logits, _ = apply_sampled(
                spec.backbone, params, kernels, images, train=True, dropout_key=dropout_key
            )
        logits = logits.astype(jnp.float32)
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
    if trainable["guide"] is not None:
        kl = spec.prior.kl(trainable["guide"], kl_key, trainable["prior"])
        beta = kl_scale(step, spec.objective)
    else:
        kernels, _ = split_params(trainable["params"], bayesian_paths(trainable["params"]))
        kl = spec.prior.neg_log_prob(kernels)  # MAP: −log p(w), the L2 penalty
        beta = jnp.ones((), jnp.float32)
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
        with the sampler's unbiased voxel weights `[B, *S]` float32 as a third element.
      spec: the static description of the model and method.

    Returns:
      The next state and scalar metrics: loss, data, kl, kl_weight, dice, grad_norm.
    """
    next_key, step_key = jax.random.split(state.key)
    if spec.method.method == "ensemble":
        member_keys = jax.random.split(step_key, spec.method.ensemble_size)

        def member(params, opt_state, key):
            updated, opt_state, metrics = _update(
                trainable_tree(params, None, None), opt_state, batch, key, state.step, spec
            )
            return updated["params"], opt_state, metrics

        params, opt_state, metrics = jax.vmap(member)(state.params, state.opt_state, member_keys)
        metrics = jax.tree_util.tree_map(jnp.mean, metrics)
        guide, prior_params = None, None
    else:
        updated, opt_state, metrics = _update(
            trainable_tree(state.params, state.guide, state.prior_params),
            state.opt_state,
            batch,
            step_key,
            state.step,
            spec,
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


def _vmaps_kernels(spec: ModelSpec) -> bool:
    """Whether the step vmaps over per-particle or per-member kernels."""
    return spec.method.method == "ensemble" or (
        spec.method.method == "vi"
        and spec.method.estimator == "full"
        and spec.method.num_particles > 1
    )


def make_train_step(spec: ModelSpec, mesh: Mesh | None = None):
    """`train_step` for `spec`, jitted, with the incoming state's buffers donated.

    With `mesh`, the batch is sharded along its `data` axis and state and metrics are
    replicated; XLA inserts the gradient all-reduce.
    """

    if _vmaps_kernels(spec):
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
