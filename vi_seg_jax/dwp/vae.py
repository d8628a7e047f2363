"""The kernel VAE of the deep weight prior (Atanov et al. 2019).

Every k×k(×k) slice w of a convolution kernel (one per output/input channel pair),
flattened to D = k^d numbers, gets the prior p(w) = ∫ p_φ(w|z) N(z; 0, I) dz. The VAE
learns the decoder p_φ(w|z) = N(w; μ_φ(z), diag σ²_φ(z)) and an encoder
r_ψ(z|w) = N(z; μ_ψ(w), diag σ²_ψ(w)) by maximising the ELBO on kernels taken from
networks trained on a source task:

    −ELBO(w) = E_r[−log p_φ(w|z)] + β · KL(r_ψ(z|w) ‖ N(0, I)),

estimated with one reparameterised sample z = μ_ψ + σ_ψ·ε. The encoder is a small conv
net (the DWP code's is), the decoder an MLP. Both log-variances are softly clamped to
[LOG_VAR_MIN, LOG_VAR_MAX] so that neither a near-constant kernel entry (σ → 0) nor a
wild initial step (σ → ∞) makes the likelihood blow up, while gradients never vanish.

The functions here are pure and take the Flax params explicitly; they are jitted with the
config static (a frozen, hashable dataclass), so they are cheap to call eagerly and nest
in other jitted code (the prior term's). `train_vae` fits the VAE on an [N, D] array of
kernels and reports the held-out ELBO against an N(0, σ²) baseline,
and `save_vae`/`load_vae` keep it on disk (Orbax arrays plus a JSON config, no pickle).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import orbax.checkpoint as ocp
from flax import traverse_util
from numpyro.distributions.kl import kl_divergence
from tqdm.auto import tqdm

from vi_seg_jax.errors import DataError
from vi_seg_jax.io.folders import replace_folder

LOG_VAR_MIN = -12.0
LOG_VAR_MAX = 4.0
ENCODER_CHANNELS = 32
ENCODER_CONV_SIZE = 3
ENCODER_MODULES = ("enc_conv", "enc_hidden", "enc_out")  # `KernelVAE`'s r_ψ(z|w)
EVAL_SAMPLES = 8  # z samples averaged in the reported −ELBO estimates
EVAL_CHUNK = 4096  # kernels per evaluation call; one fixed shape, so one compilation
LOG_EVERY_STEPS = 100

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
FORMAT_NAME = "vi_seg_jax.dwp.kernel_vae"
FORMAT_VERSION = 1

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Shape of the kernel VAE and how it is trained.

    Attributes:
      kernel_size: k, the spatial size of the kernels modelled (3 for 3×3(×3)).
      spatial_dims: d, 2 or 3.
      latent_dim: L, size of z (6 by default, as for the deep weight prior's 3×3 kernels).
      hidden: width of the encoder's and decoder's dense layers.
      learning_rate: Adam step size.
      batch_size: kernels per training step (drawn with replacement).
      steps: training steps.
      beta_warmup_steps: β, the KL weight, rises linearly 0 → 1 over these steps
        (0: β = 1 throughout). Warm-up keeps the encoder from collapsing onto the prior
        before the decoder has learnt anything.
      holdout_fraction: share of the kernels held out to report the ELBO on.
      validate_every: early stopping: every this many steps (after the β warm-up) the
        −ELBO of a validation share (`holdout_fraction` of the training kernels) is
        measured and the best parameters are kept; 0 trains for all `steps`. Small layer
        groups (a few hundred kernels) otherwise over-fit badly.
    """

    kernel_size: int = 3
    spatial_dims: int = 3
    latent_dim: int = 6
    hidden: int = 64
    learning_rate: float = 5e-4
    batch_size: int = 128
    steps: int = 3000
    beta_warmup_steps: int = 500
    holdout_fraction: float = 0.1
    validate_every: int = 500

    def __post_init__(self):
        checks = {
            "kernel_size must be >= 1": self.kernel_size >= 1,
            "spatial_dims must be 2 or 3": self.spatial_dims in (2, 3),
            "latent_dim must be >= 1": self.latent_dim >= 1,
            "hidden must be >= 1": self.hidden >= 1,
            "learning_rate must be > 0": self.learning_rate > 0,
            "batch_size must be >= 1": self.batch_size >= 1,
            "steps must be >= 0": self.steps >= 0,
            "beta_warmup_steps must be >= 0": self.beta_warmup_steps >= 0,
            "holdout_fraction must be in (0, 1)": 0.0 < self.holdout_fraction < 1.0,
            "validate_every must be >= 0": self.validate_every >= 0,
        }
        failed = [message for message, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"VAEConfig: {'; '.join(failed)}")

    @property
    def kernel_dim(self) -> int:
        """D, the number of weights in one flattened kernel slice."""
        return self.kernel_size**self.spatial_dims

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return (self.kernel_size,) * self.spatial_dims

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ELBOTerms(NamedTuple):
    """Per-kernel pieces of the ELBO, each [n] (z: [n, L])."""

    neg_log_lik: jax.Array  # −log p_φ(w|z) at the sampled z
    kl: jax.Array  # KL(r_ψ(z|w) ‖ N(0, I)), closed form
    z: jax.Array


def soft_clamp(x: jax.Array, low: float, high: float) -> jax.Array:
    """≈ x inside [low, high], smoothly saturating outside; the gradient never vanishes
    (unlike `clip`), so a log-variance pushed past a bound can still come back."""
    x = low + jax.nn.softplus(x - low)
    return high - jax.nn.softplus(high - x)


class KernelVAE(nn.Module):
    """Encoder r_ψ(z|w) and decoder p_φ(w|z) over flattened kernel slices w [n, D].

    Encoder: w reshaped to [n, k, k(, k), 1] → 3×3(×3) SAME conv, 32 channels, ELU →
    flatten → dense(hidden), ELU → dense(2L) = (μ_z, log σ²_z).
    Decoder: z → dense(hidden), ELU → dense(hidden), ELU → dense(2D) = (μ_w, log σ²_w).
    """

    config: VAEConfig

    def setup(self):
        c = self.config
        self.enc_conv = nn.Conv(
            ENCODER_CHANNELS, (ENCODER_CONV_SIZE,) * c.spatial_dims, padding="SAME"
        )
        self.enc_hidden = nn.Dense(c.hidden)
        self.enc_out = nn.Dense(2 * c.latent_dim)
        self.dec_hidden1 = nn.Dense(c.hidden)
        self.dec_hidden2 = nn.Dense(c.hidden)
        self.dec_out = nn.Dense(2 * c.kernel_dim)

    def encode(self, w: jax.Array) -> tuple[jax.Array, jax.Array]:
        """w [n, D] → (μ_z [n, L], log σ²_z [n, L])."""
        c = self.config
        h = jnp.reshape(w, (w.shape[0], *c.kernel_shape, 1))
        h = nn.elu(self.enc_conv(h))
        h = jnp.reshape(h, (w.shape[0], -1))
        h = nn.elu(self.enc_hidden(h))
        out = self.enc_out(h)
        mu, log_var = jnp.split(out, 2, axis=-1)
        return mu, soft_clamp(log_var, LOG_VAR_MIN, LOG_VAR_MAX)

    def decode(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        """z [n, L] → (μ_w [n, D], log σ²_w [n, D])."""
        h = nn.elu(self.dec_hidden1(z))
        h = nn.elu(self.dec_hidden2(h))
        out = self.dec_out(h)
        mu, log_var = jnp.split(out, 2, axis=-1)
        return mu, soft_clamp(log_var, LOG_VAR_MIN, LOG_VAR_MAX)

    def __call__(self, w: jax.Array, key: jax.Array) -> ELBOTerms:
        """One reparameterised z = μ_z + σ_z·ε, ε = `jax.random.normal(key, μ_z.shape)`."""
        mu_z, log_var_z = self.encode(w)
        scale_z = jnp.exp(0.5 * log_var_z)
        z = mu_z + scale_z * jax.random.normal(key, mu_z.shape, mu_z.dtype)
        mu_w, log_var_w = self.decode(z)
        neg_log_lik = _gaussian_neg_log_prob(w, mu_w, log_var_w)
        kl = jnp.sum(kl_divergence(dist.Normal(mu_z, scale_z), dist.Normal(0.0, 1.0)), axis=-1)
        return ELBOTerms(neg_log_lik, kl, z)


def _gaussian_neg_log_prob(w: jax.Array, mu: jax.Array, log_var: jax.Array) -> jax.Array:
    """−log N(w; μ, diag exp(log_var)) summed over the last axis."""
    return -jnp.sum(dist.Normal(mu, jnp.exp(0.5 * log_var)).log_prob(w), axis=-1)


def _as_kernels(w, config: VAEConfig) -> jax.Array:
    w = jnp.asarray(w, jnp.float32)
    if w.ndim != 2 or w.shape[1] != config.kernel_dim:
        raise ValueError(
            f"kernels must be [n, {config.kernel_dim}] (kernel_size {config.kernel_size}, "
            f"spatial_dims {config.spatial_dims}), got shape {w.shape}"
        )
    return w


def _as_latents(z, config: VAEConfig) -> jax.Array:
    z = jnp.asarray(z, jnp.float32)
    if z.ndim != 2 or z.shape[1] != config.latent_dim:
        raise ValueError(f"latents must be [n, {config.latent_dim}], got shape {z.shape}")
    return z


def init_vae(key: jax.Array, config: VAEConfig) -> Params:
    """Fresh VAE parameters (the `params` collection of `KernelVAE(config)`)."""
    return _init_fn(config)(key)


@functools.cache
def _init_fn(config: VAEConfig):
    # Jitted: Flax's init run op by op compiles every small op separately (seconds).
    def init(key):
        init_key, noise_key = jax.random.split(key)
        dummy = jnp.zeros((1, config.kernel_dim), jnp.float32)
        return KernelVAE(config).init(init_key, dummy, noise_key)["params"]

    return jax.jit(init)


@functools.partial(jax.jit, static_argnames=("config",))
def encode(params: Params, config: VAEConfig, w) -> tuple[jax.Array, jax.Array]:
    """w [n, D] → (μ_z, log σ²_z), each [n, L]."""
    w = _as_kernels(w, config)
    return KernelVAE(config).apply({"params": params}, w, method=KernelVAE.encode)


@functools.partial(jax.jit, static_argnames=("config",))
def decode(params: Params, config: VAEConfig, z) -> tuple[jax.Array, jax.Array]:
    """z [n, L] → (μ_w, log σ²_w), each [n, D]."""
    z = _as_latents(z, config)
    return KernelVAE(config).apply({"params": params}, z, method=KernelVAE.decode)


def encoder_params(params: Params) -> Params:
    """The encoder's part of a VAE's params (r_ψ: what Algorithm 1 may go on training)."""
    return {name: value for name, value in params.items() if name in ENCODER_MODULES}


def with_encoder(params: Params, encoder: Params) -> Params:
    """`params` with its encoder replaced by `encoder` (the decoder is kept)."""
    return {**params, **encoder}


@functools.partial(jax.jit, static_argnames=("config",))
def decoder_neg_log_prob(params: Params, config: VAEConfig, w, z) -> jax.Array:
    """−log p_φ(w|z) per kernel, [n] (w [n, D], z [n, L])."""
    w = _as_kernels(w, config)
    mu, log_var = decode(params, config, z)
    return _gaussian_neg_log_prob(w, mu, log_var)


@functools.partial(jax.jit, static_argnames=("config",))
def elbo_terms(params: Params, config: VAEConfig, w, key: jax.Array) -> ELBOTerms:
    """The ELBO's pieces per kernel with one reparameterised z sample (see `KernelVAE`)."""
    w = _as_kernels(w, config)
    return KernelVAE(config).apply({"params": params}, w, key)


def negative_elbo(
    params: Params, config: VAEConfig, w, key: jax.Array, beta: float | jax.Array = 1.0
) -> jax.Array:
    """−ELBO per kernel, [n]: −log p_φ(w|z) + β·KL(r_ψ(z|w) ‖ N(0, I)), one z sample."""
    terms = elbo_terms(params, config, w, key)
    return terms.neg_log_lik + beta * terms.kl


@functools.partial(jax.jit, static_argnames=("config", "n", "mean_only"))
def sample_kernels(
    params: Params, config: VAEConfig, key: jax.Array, n: int, *, mean_only: bool = False
) -> jax.Array:
    """n kernels [n, D] from the prior: z ~ N(0, I), w ~ p_φ(w|z) (μ_w when `mean_only`)."""
    z_key, w_key = jax.random.split(key)
    z = jax.random.normal(z_key, (n, config.latent_dim), jnp.float32)
    mu, log_var = decode(params, config, z)
    if mean_only:
        return mu
    return mu + jnp.exp(0.5 * log_var) * jax.random.normal(w_key, mu.shape, mu.dtype)


# --- training ---------------------------------------------------------------------------


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


def beta_at(step: jax.Array, warmup_steps: int) -> jax.Array:
    """KL weight at `step` (0-based): linear 0 → 1 over `warmup_steps`, then 1."""
    if warmup_steps == 0:
        return jnp.ones((), jnp.float32)
    return jnp.minimum(1.0, step.astype(jnp.float32) / warmup_steps)


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
        beta = beta_at(step, config.beta_warmup_steps)
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
    _as_kernels(kernels[:1], config)  # shape check
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


# --- storage ----------------------------------------------------------------------------


def save_vae(directory: str | Path, params: Params, config: VAEConfig) -> None:
    """Writes `directory/params/` (Orbax, arrays and JSON metadata) and
    `directory/config.json`, replacing any VAE already there.

    Everything is written into a temporary sibling directory first and renamed into place,
    so a crash leaves either the old VAE or the new one, never a half-written one.
    """
    directory = Path(directory).absolute()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp / PARAMS_DIR, params)
            checkpointer.wait_until_finished()
        document = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": config.to_dict()}
        (tmp / CONFIG_FILE).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        replace_folder(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_vae(directory: str | Path) -> tuple[Params, VAEConfig]:
    """Reads a VAE written by `save_vae`; raises DataError naming what is missing or wrong."""
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise DataError(directory, "no kernel VAE here (not a directory)")
    config = _read_config(directory / CONFIG_FILE)
    params_path = directory / PARAMS_DIR
    if not params_path.is_dir():
        raise DataError(params_path, "kernel VAE parameters missing")
    like = jax.eval_shape(_init_fn(config), jax.random.key(0))
    expected = _shapes(like)
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            stored = _shapes(checkpointer.metadata(params_path).item_metadata.tree)
        except Exception as error:  # Orbax raises many types; all mean an unreadable VAE
            raise DataError(
                params_path, f"unreadable kernel VAE parameters: {_one_line(error)}"
            ) from error
        # Compared before restoring: a restore that fails midway leaves Orbax coroutines
        # never awaited, and the arrays' shapes say all that is wrong anyway.
        if stored != expected:
            differing = sorted(set(stored.items()) ^ set(expected.items()))
            raise DataError(
                params_path,
                f"kernel VAE parameters do not match {CONFIG_FILE} "
                f"(first difference: {differing[0][0]})",
            )
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        try:
            params = checkpointer.restore(params_path, abstract)
        except Exception as error:
            raise DataError(
                params_path, f"unreadable kernel VAE parameters: {_one_line(error)}"
            ) from error
    return params, config


def _shapes(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """'/'-joined path → (shape, dtype name) of every array (or array metadata) leaf."""
    flat = traverse_util.flatten_dict(tree, sep="/")
    return {path: (tuple(leaf.shape), np.dtype(leaf.dtype).name) for path, leaf in flat.items()}


def _one_line(error: Exception) -> str:
    # DataError messages are one line; Orbax's can run to several.
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _read_config(path: Path) -> VAEConfig:
    if not path.is_file():
        raise DataError(path, "kernel VAE config missing")
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(path, f"unreadable kernel VAE config: {error}") from error
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise DataError(path, f"not a kernel VAE config (expected format {FORMAT_NAME!r})")
    if document.get("version") != FORMAT_VERSION:
        raise DataError(
            path,
            f"kernel VAE format version {document.get('version')!r}, expected {FORMAT_VERSION}",
        )
    values = document.get("config")
    try:
        if not isinstance(values, dict):
            raise TypeError("'config' is not an object")
        return VAEConfig(**values)
    except (TypeError, ValueError) as error:
        raise DataError(path, f"invalid kernel VAE config: {error}") from error
