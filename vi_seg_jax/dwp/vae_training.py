"""Fitting the kernel VAE (`vae.KernelVAE`) to kernel slices, with a held-out report.

`train_vae` runs Adam on minibatches drawn with replacement from an [N, D] array of
kernels, with the KL weight β warmed up linearly (`bayes.elbo.linear_warmup`) and, optionally, early
stopping on a validation share. It reports the held-out −ELBO against the N(0, σ²)
baseline (`normal_neg_log_lik`) that a group whose VAE loses falls back to
(`experiments.train_prior` decides).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from vi_seg_jax.bayes.elbo import linear_warmup
from vi_seg_jax.dwp.vae import Params, VAEConfig, as_kernels, init_vae, negative_elbo

EVAL_SAMPLES = 8  # z samples averaged in the reported −ELBO estimates
EVAL_CHUNK = 4096  # kernels per evaluation call; one fixed shape, so one compilation
LOG_EVERY_STEPS = 100


def split_kernels(
    kernels: np.ndarray, holdout_fraction: float, key: jax.Array
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split into (train, held-out); both non-empty."""
    n = kernels.shape[0]
    n_heldout = max(1, round(holdout_fraction * n))
    if n - n_heldout < 1:
        raise ValueError(f"{n} kernels are too few to hold out {holdout_fraction:.0%}")
    order = np.asarray(jax.random.permutation(key, n))
    return kernels[order[n_heldout:]], kernels[order[:n_heldout]]


def normal_neg_log_lik(kernels: np.ndarray, variance: float) -> np.ndarray:
    """−log N(w; 0, σ²I) per kernel (float64, NumPy)."""
    w = np.asarray(kernels, np.float64)
    dim = w.shape[1]
    return 0.5 * np.sum(w**2, axis=1) / variance + 0.5 * dim * math.log(2 * math.pi * variance)


def _make_train_step(config: VAEConfig, optimizer: optax.GradientTransformation):
    """Jitted (params, opt_state, train_kernels, key, step) → (params, opt_state, loss).

    The minibatch indices and the z noise come from `fold_in(key, step)`, so step s always
    sees the same batch and noise whatever ran before it.
    """

    def loss_fn(params, batch, key, beta):
        return jnp.mean(negative_elbo(params, config, batch, key, beta))

    @jax.jit
    def step_fn(params, opt_state, train, key, step):
        batch_key, noise_key = jax.random.split(jax.random.fold_in(key, step))
        index = jax.random.randint(batch_key, (config.batch_size,), 0, train.shape[0])
        beta = linear_warmup(step, config.beta_warmup_steps)
        loss, grads = jax.value_and_grad(loss_fn)(params, train[index], noise_key, beta)
        # optax's Adam bias correction raises a float to an int32 step count, which the
        # strict dtype promotion some callers run under refuses.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step_fn


def _make_evaluator(config: VAEConfig):
    """Mean −ELBO (β = 1) over `EVAL_SAMPLES` z samples, per kernel, for any [N, D] array."""

    @jax.jit
    def chunk_fn(params, chunk, key):
        keys = jax.random.split(key, EVAL_SAMPLES)
        per_sample = jax.vmap(lambda k: negative_elbo(params, config, chunk, k))(keys)
        return jnp.mean(per_sample, axis=0)

    def evaluate(params, kernels: np.ndarray, key: jax.Array) -> np.ndarray:
        values = []
        for i, start in enumerate(range(0, kernels.shape[0], EVAL_CHUNK)):
            chunk = kernels[start : start + EVAL_CHUNK]
            # Pad to the one chunk shape so that every call reuses one compilation.
            padded = np.zeros((EVAL_CHUNK, kernels.shape[1]), np.float32)
            padded[: chunk.shape[0]] = chunk
            out = chunk_fn(params, jnp.asarray(padded), jax.random.fold_in(key, i))
            values.append(np.asarray(out)[: chunk.shape[0]])
        return np.concatenate(values)

    return evaluate


def train_vae(
    kernels: np.ndarray, config: VAEConfig, key: jax.Array, *, progress: bool = True
) -> tuple[Params, dict[str, Any]]:
    """Fits the VAE to kernels [N, D]; returns (params, report).

    The kernels are split (seeded by `key`) into train and held-out sets by
    `config.holdout_fraction`. Report (floats in nats per kernel, means over kernels):
      train_kernels, heldout_kernels: the two set sizes (train without the early-stopping
        validation share, `validation_kernels`);
      heldout_neg_elbo: −ELBO on the held-out kernels, averaged over 8 z samples;
      heldout_normal_neg_log_lik: −log N(w; 0, σ²I) on them, σ² fitted by maximum
        likelihood on the training kernels — the baseline the VAE must beat;
      normal_variance: that σ²;
      final_train_neg_elbo: −ELBO (β = 1, 8 z samples) on the training kernels at the end;
      best_step: the step whose parameters are returned (early stopping, see VAEConfig).
    """
    kernels = np.asarray(kernels, np.float32)
    as_kernels(kernels[:1], config)  # shape check
    if not np.all(np.isfinite(kernels)):
        raise ValueError("kernels contain non-finite values")
    split_key, init_key, train_key, eval_key = jax.random.split(key, 4)
    train, heldout = split_kernels(kernels, config.holdout_fraction, split_key)

    evaluate = _make_evaluator(config)
    validation = None
    if config.validate_every and train.shape[0] >= 20:
        fit_key, validation_key = jax.random.split(jax.random.fold_in(split_key, 1))
        train, validation = split_kernels(train, config.holdout_fraction, fit_key)
    params = init_vae(init_key, config)
    best_params, best_value, best_step = params, math.inf, config.steps
    optimizer = optax.adam(config.learning_rate)
    opt_state = optimizer.init(params)
    step_fn = _make_train_step(config, optimizer)
    train_device = jnp.asarray(train)
    bar = tqdm(
        total=config.steps, desc="kernel VAE", unit="step", disable=None if progress else True
    )
    with bar:
        for step in range(config.steps):
            params, opt_state, loss = step_fn(
                params, opt_state, train_device, train_key, jnp.asarray(step, jnp.int32)
            )
            done = step + 1
            if done % LOG_EVERY_STEPS == 0 or done == config.steps:
                value = float(loss)  # syncs only every LOG_EVERY_STEPS steps
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"kernel VAE loss became {value} at step {done}; lower the learning "
                        "rate or lengthen beta_warmup_steps"
                    )
                bar.set_postfix(neg_elbo=f"{value:.4g}")
                bar.update(done - bar.n)
            checkpoint = done % config.validate_every == 0 if config.validate_every else False
            if validation is not None and (checkpoint or done == config.steps):
                if done >= config.beta_warmup_steps:  # β = 1: the ELBO proper
                    value = float(np.mean(evaluate(params, validation, validation_key)))
                    if value < best_value:
                        best_params, best_value, best_step = params, value, done
    if validation is not None and math.isfinite(best_value):
        params = best_params
    else:
        best_step = config.steps

    heldout_key, train_eval_key = jax.random.split(eval_key)
    variance = float(np.mean(np.square(train, dtype=np.float64)))
    report = {
        "train_kernels": int(train.shape[0]),
        "heldout_kernels": int(heldout.shape[0]),
        "heldout_neg_elbo": float(np.mean(evaluate(params, heldout, heldout_key))),
        "heldout_normal_neg_log_lik": float(np.mean(normal_neg_log_lik(heldout, variance))),
        "normal_variance": variance,
        "final_train_neg_elbo": float(np.mean(evaluate(params, train, train_eval_key))),
        "best_step": best_step,
        "validation_kernels": 0 if validation is None else int(validation.shape[0]),
    }
    return params, report
