"""The kernel VAE of the deep weight prior (Atanov et al. 2019): the model.

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
in other jitted code (the prior term's). Fitting the VAE to kernels is
`vae_training.train_vae`; keeping it on disk is `vae_storage.save_vae`/`load_vae`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro.distributions.kl import kl_divergence

LOG_VAR_MIN = -12.0
LOG_VAR_MAX = 4.0
ENCODER_CHANNELS = 32
ENCODER_CONV_SIZE = 3
ENCODER_MODULES = ("enc_conv", "enc_hidden", "enc_out")  # `KernelVAE`'s r_ψ(z|w)

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


def as_kernels(w, config: VAEConfig) -> jax.Array:
    """`w` as float32 [n, D]; raises ValueError naming the expected shape otherwise."""
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
    w = as_kernels(w, config)
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
    w = as_kernels(w, config)
    mu, log_var = decode(params, config, z)
    return _gaussian_neg_log_prob(w, mu, log_var)


@functools.partial(jax.jit, static_argnames=("config",))
def elbo_terms(params: Params, config: VAEConfig, w, key: jax.Array) -> ELBOTerms:
    """The ELBO's pieces per kernel with one reparameterised z sample (see `KernelVAE`)."""
    w = as_kernels(w, config)
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
