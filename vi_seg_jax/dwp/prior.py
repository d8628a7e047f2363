"""The deep weight prior as a `Prior`: the variational bound that replaces the closed-form KL.

For a kernel slice with q(w) = N(μ, diag σ²) and the implicit prior
p(w) = ∫ p_φ(w|z) N(z; 0, I) dz of a kernel VAE, −log p(w) ≤ E_{r_ψ(z|w)}[−log p_φ(w|z)]
+ KL(r_ψ(z|w) ‖ N(0, I)) for any encoder r_ψ, hence

    KL(q ‖ p) ≤ −H[q] + E_{ŵ~q} [ E_{ẑ~r(z|ŵ)}[−log p_φ(ŵ|ẑ)] + KL(r_ψ(z|ŵ) ‖ N(0, I)) ],

estimated with one reparameterised ŵ and one ẑ per slice (Atanov et al. 2019, Algorithm 1;
the gap is E_q KL(r_ψ(z|w) ‖ p(z|w)) ≥ 0). H[q] is in closed form. The decoders are
frozen. The encoders are frozen too unless `train_encoder` (Algorithm 1's option): the bound
holds for any encoder, so minimising it over ψ jointly with q only tightens it. Their
parameters are then the prior's `init_params()`, kept in the train state and optimised with q.
Slices are evaluated with `jax.lax.map` in chunks, so memory is bounded whatever the
network's size. Layers no VAE covers keep the N(0, s²) KL.

A group whose VAE fits its held-out source kernels worse than a Gaussian does (small groups
with few hundred kernels, where a VAE over-fits) gets that Gaussian instead: N(0, σ²_g) with
σ²_g the maximum-likelihood fit on the group's source kernels, in closed form
(`gaussian_groups` in the manifest; `experiments.train_prior` decides).

A prior folder (written by `experiments.train_prior`) holds `manifest.json` (backbone,
spatial dims, kernel size, layer groups, training reports), `kernels/<group>.npy` and
`vae/<group>/` (Orbax). `load_prior` refuses a folder built for another backbone, kernel
size or layer grouping.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vi_seg_jax.bayes.guide import GuideParams, ParamPath
from vi_seg_jax.bayes.priors import NormalPrior
from vi_seg_jax.dwp.kernels import default_groups, path_name
from vi_seg_jax.dwp.vae import (
    VAEConfig,
    decoder_neg_log_prob,
    encode,
    encoder_params,
    sample_kernels,
    with_encoder,
)
from vi_seg_jax.dwp.vae_storage import load_vae, save_vae
from vi_seg_jax.errors import DataError
from vi_seg_jax.io.folders import replace_folder

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_LOG_2PI_E = math.log(2.0 * math.pi) + 1.0


def guide_rows(leaf: jax.Array) -> jax.Array:
    """`[*k, C_in, C_out]` -> `[C_in · C_out, k^d]` (as `kernels.kernel_slices`)."""
    spatial = math.prod(leaf.shape[:-2])
    return leaf.reshape(spatial, -1).T


def bound_terms(
    vae_params: Any, vae_config: VAEConfig, w: jax.Array, z_noise: jax.Array
) -> jax.Array:
    """E_r[−log p_φ(w|ẑ)] + KL(r_ψ(z|w) ‖ N(0, I)) per row, one ẑ each: `[n]`."""
    mu, log_var = encode(vae_params, vae_config, w)
    z = mu + jnp.exp(0.5 * log_var) * z_noise
    kl = 0.5 * jnp.sum(jnp.square(mu) + jnp.exp(log_var) - 1.0 - log_var, axis=-1)
    return decoder_neg_log_prob(vae_params, vae_config, w, z) + kl


def group_kl_bound(
    vae_params: Any,
    vae_config: VAEConfig,
    loc: jax.Array,
    log_var: jax.Array,
    key: jax.Array,
    chunk_size: int = 4096,
) -> jax.Array:
    """The bound on Σ_rows KL(q ‖ p) for rows of q = N(loc, exp(log_var)), `[n, D]` each."""
    w_key, z_key = jax.random.split(key)
    w = loc + jnp.exp(0.5 * log_var) * jax.random.normal(w_key, loc.shape, loc.dtype)
    z_noise = jax.random.normal(z_key, (loc.shape[0], vae_config.latent_dim), loc.dtype)

    def one(row):
        w_row, z_row = row
        return bound_terms(vae_params, vae_config, w_row[None], z_row[None])[0]

    terms = jax.lax.map(one, (w, z_noise), batch_size=min(chunk_size, loc.shape[0]))
    neg_entropy = -0.5 * jnp.sum(_LOG_2PI_E + log_var)
    return jnp.sum(terms) + neg_entropy


@dataclasses.dataclass(frozen=True, eq=False)
class DeepWeightPrior:
    """DWP over the kernels of `groups` (name → paths), N(0, s²) elsewhere.

    Attributes:
      vaes: group name → (VAE params, VAEConfig), frozen.
      groups: group name → the Bayesian kernel paths it covers.
      fallback: the prior of kernels no group covers.
      chunk_size: kernel slices evaluated together.
      gaussian: group name → σ² for the groups that take N(0, σ²) instead of their VAE.
      train_encoder: the VAEs' encoders are trained with q (their parameters come in through
        `kl`'s `params`, starting from `init_params()`).
    """

    vaes: dict[str, tuple[Any, VAEConfig]]
    groups: dict[str, tuple[ParamPath, ...]]
    fallback: NormalPrior = NormalPrior()
    chunk_size: int = 4096
    gaussian: dict[str, float] = dataclasses.field(default_factory=dict)
    train_encoder: bool = False

    def init_params(self) -> dict[str, Any] | None:
        """Group name → its VAE's encoder params (the trained part), or None when frozen."""
        if not self.train_encoder:
            return None
        return {
            name: encoder_params(self.vaes[name][0])
            for name in sorted(self.groups)
            if name not in self.gaussian
        }

    def kl(
        self,
        guide: GuideParams,
        key: jax.Array | None = None,
        params: dict[str, Any] | None = None,
    ) -> jax.Array:
        """The bound; `params`: group → trained encoder params (the VAE's own when absent)."""
        if key is None:
            raise ValueError("the deep weight prior's KL bound is stochastic: pass a key")
        loc = traverse_util.flatten_dict(dict(guide.loc))
        log_var = traverse_util.flatten_dict(dict(guide.log_var))
        covered = {path for paths in self.groups.values() for path in paths}
        rest = [p for p in loc if p not in covered]
        total = self.fallback.kl(
            GuideParams(
                loc=traverse_util.unflatten_dict({p: loc[p] for p in rest}),
                log_var=traverse_util.unflatten_dict({p: log_var[p] for p in rest}),
            )
        )
        keys = jax.random.split(key, len(self.groups))
        for group_key, (name, paths) in zip(keys, sorted(self.groups.items()), strict=True):
            if name in self.gaussian:
                subset = GuideParams(
                    loc=traverse_util.unflatten_dict({p: loc[p] for p in paths}),
                    log_var=traverse_util.unflatten_dict({p: log_var[p] for p in paths}),
                )
                total = total + NormalPrior(math.sqrt(self.gaussian[name])).kl(subset)
                continue
            vae_params, config = self.vaes[name]
            if params is not None and name in params:
                vae_params = with_encoder(vae_params, params[name])
            rows_loc = jnp.concatenate([guide_rows(loc[p]) for p in paths])
            rows_log_var = jnp.concatenate([guide_rows(log_var[p]) for p in paths])
            total = total + group_kl_bound(
                vae_params, config, rows_loc, rows_log_var, group_key, self.chunk_size
            )
        return total

    def neg_log_prob(self, kernels) -> jax.Array:
        raise ValueError("the deep weight prior is for variational training (--method vi)")


def write_prior(
    directory: str | Path,
    *,
    backbone: str,
    spatial_dims: int,
    groups: dict[str, list[ParamPath]],
    kernels: dict[str, np.ndarray],
    vaes: dict[str, tuple[Any, VAEConfig]],
    reports: dict[str, Any],
    gaussian_groups: dict[str, float] | None = None,
) -> Path:
    """Writes a prior folder atomically (built beside the target, then renamed).

    `gaussian_groups`: group → σ² of the groups whose prior is N(0, σ²) instead of the VAE.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        (staging / "kernels").mkdir()
        for name, rows in kernels.items():
            np.save(staging / "kernels" / f"{name}.npy", rows)
        for name, (params, config) in vaes.items():
            save_vae(staging / "vae" / name, params, config)
        manifest = {
            "format": FORMAT_VERSION,
            "backbone": backbone,
            "spatial_dims": spatial_dims,
            "kernel_size": 3,
            "groups": {name: [path_name(p) for p in paths] for name, paths in groups.items()},
            "gaussian_groups": dict(gaussian_groups or {}),
            "reports": reports,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_folder(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return directory


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DataError(Path(directory), "not a deep-weight-prior folder (no manifest.json)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(path, f"is not valid JSON ({error})") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise DataError(path, f"format {manifest.get('format')!r}, expected {FORMAT_VERSION}")
    return manifest


def load_prior(
    directory: str | Path,
    *,
    backbone: str,
    spatial_dims: int,
    paths: tuple[ParamPath, ...],
    fallback: NormalPrior | None = None,
    train_encoder: bool = False,
) -> DeepWeightPrior:
    """The prior of a folder, checked against the target network.

    Raises:
      DataError: the folder was built for another backbone, spatial dims / kernel size or
        layer grouping than the target's (`paths`: its Bayesian kernels).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    where = directory / MANIFEST
    if manifest["backbone"] != backbone:
        raise DataError(
            where, f"prior built for backbone {manifest['backbone']}, this run uses {backbone}"
        )
    if manifest["spatial_dims"] != spatial_dims or manifest["kernel_size"] != 3:
        raise DataError(
            where,
            f"prior built for {manifest['kernel_size']}^{manifest['spatial_dims']} kernels, "
            f"this run has 3^{spatial_dims}",
        )
    expected = {
        name: [path_name(p) for p in group]
        for name, group in default_groups(backbone, paths).items()
    }
    if manifest["groups"] != expected:
        raise DataError(
            where,
            f"layer grouping {_describe(manifest['groups'])} differs from this network's "
            f"{_describe(expected)} (another depth or variant?)",
        )
    vaes = {}
    for name in expected:
        params, config = load_vae(directory / "vae" / name)
        if config.spatial_dims != spatial_dims:
            raise DataError(directory / "vae" / name, f"VAE for {config.spatial_dims}D kernels")
        vaes[name] = (params, config)
    groups = {name: tuple(tuple(p.split("/")) for p in group) for name, group in expected.items()}
    gaussian = {name: float(v) for name, v in manifest.get("gaussian_groups", {}).items()}
    return DeepWeightPrior(
        vaes=vaes,
        groups=groups,
        fallback=fallback or NormalPrior(),
        gaussian=gaussian,
        train_encoder=train_encoder,
    )


def _describe(groups: dict[str, list[str]]) -> str:
    return "{" + ", ".join(f"{name}: {len(paths)} layers" for name, paths in groups.items()) + "}"


def init_locations_from_prior(
    key: jax.Array, guide: GuideParams, prior: DeepWeightPrior
) -> GuideParams:
    """Posterior means drawn from the VAEs (DWP initialisation); other kernels unchanged."""
    loc = traverse_util.flatten_dict(dict(guide.loc))
    keys = jax.random.split(key, len(prior.groups))
    for group_key, (name, paths) in zip(keys, sorted(prior.groups.items()), strict=True):
        params, config = prior.vaes[name]
        layer_keys = jax.random.split(group_key, len(paths))
        for layer_key, path in zip(layer_keys, paths, strict=True):
            shape = loc[path].shape
            if name in prior.gaussian:
                scale = math.sqrt(prior.gaussian[name])
                loc[path] = scale * jax.random.normal(layer_key, shape, jnp.float32)
                continue
            rows = sample_kernels(params, config, layer_key, math.prod(shape[-2:]))
            loc[path] = jnp.asarray(rows, jnp.float32).T.reshape(shape)
    return dataclasses.replace(guide, loc=traverse_util.unflatten_dict(loc))
