"""Build a deep weight prior: source networks → kernel slices → one kernel VAE per layer group.

    python -m experiments.train_prior --backbone unet --out priors/unet
    python -m experiments.train --backbone unet --prior dwp --prior-dir priors/unet

One command runs the three steps of method.md §4: (1) trains `--sources` deterministic
networks of the backbone (seeds 0, 1, ...) on the source domain — by default the embedded
synthetic `lesions` domain (small MS-like lesions), any BraTS-layout folder with
`--source-data-dir`; or reuses trained runs given with `--source-runs`; (2) collects their
3×3(×3) kernel slices per layer group, dropping those with L2 norm ≤ 1e-2; (3) trains a
kernel VAE per group (latent 6, Adam 2e-3, batch 512, 20 000 steps, β warm-up; the DWP
code's 5e-4 / 128 with `--vae-learning-rate 5e-4 --vae-batch-size 128`) and reports its held-out
ELBO against an N(0, σ²) fit; a group whose VAE loses keeps that Gaussian as its prior
(`--always-vae` keeps every VAE). The folder (manifest.json, kernels/, vae/) is written
atomically. Source runs land in `OUT.sources/` and are reused when the command is rerun.
`build_prior(PriorSettings(out=...))` does the same from Python (the studies call it).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from experiments.common import make_parser, run_cli
from experiments.configs import PRESETS, get_config, with_overrides
from vi_seg_jax.backbones import BACKBONES
from vi_seg_jax.dwp.vae import VAEConfig

# The kernel VAEs (their `spatial_dims` is the source runs'). The DWP code's Adam 5e-4 with
# batch 128 under-fits at CPU step budgets (measured on 65k kernels: held-out −ELBO −23.0
# nats after 10k steps, −25.7 with 2e-3 / 512 / 20k).
PRIOR_VAE = VAEConfig(latent_dim=6, learning_rate=2e-3, batch_size=512, steps=20_000)


@dataclasses.dataclass(frozen=True)
class PriorSettings:
    """What `build_prior` builds (the flags of `python -m experiments.train_prior`).

    `None` takes the preset's value (`spatial_dims`, `features`, `patch`), the synthetic
    lesions domain (`source_data_dir`), or trains `sources` new source runs (`source_runs`).
    `vae` is every layer group's kernel VAE but for its `spatial_dims`, the source runs'.
    """

    out: Path
    backbone: str = "unet"
    preset: str = "quick"
    spatial_dims: int | None = None
    features: tuple[int, ...] | None = None
    patch: tuple[int, ...] | None = None
    source_data_dir: Path | None = None
    source_runs: tuple[Path, ...] | None = None
    sources: int = 2
    source_steps: int = 200
    vae: VAEConfig = PRIOR_VAE
    seed: int = 0
    always_vae: bool = False
    progress: bool = True


# The fields set by a flag of the same name (`--out` has no default; `--no-progress`; `vae`'s
# fields have their own flags).
_FLAG_FIELDS = tuple(
    f.name for f in dataclasses.fields(PriorSettings) if f.name not in ("out", "progress", "vae")
)
# Flag -> the `VAEConfig` field it sets.
_VAE_FLAGS = {
    "vae_steps": "steps",
    "latent_dim": "latent_dim",
    "vae_learning_rate": "learning_rate",
    "vae_batch_size": "batch_size",
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = make_parser("experiments.train_prior", __doc__)
    add = parser.add_argument
    add("--backbone", choices=sorted(BACKBONES), help="target architecture")
    add("--out", required=True, type=Path, help="the prior folder to write")
    add("--preset", choices=PRESETS, help="configuration of the source runs")
    add("--spatial-dims", type=int, choices=(2, 3), help="2D or 3D networks (preset default)")
    add("--features", type=int, nargs="+", help="channels per level (preset default)")
    add("--patch", type=int, nargs="+", help="training patch of the source runs")
    add("--source-data-dir", type=Path, help="source dataset (default: synthetic lesions)")
    add("--source-runs", type=Path, nargs="+", help="trained deterministic runs to reuse")
    add("--sources", type=int, help="source networks to train (seeds 0..S-1)")
    add("--source-steps", type=int, help="training steps per source network")
    add("--vae-steps", type=int, help="VAE training steps per layer group")
    add("--latent-dim", type=int, help="VAE latent size")
    add("--vae-learning-rate", type=float, help="Adam step size of the VAEs")
    add("--vae-batch-size", type=int, help="kernels per VAE step")
    add("--seed", type=int, help="seed of the VAEs")
    add(
        "--always-vae",
        action="store_true",
        help="keep every group's VAE; by default a group whose VAE fits its held-out kernels "
        "worse than N(0, σ²) gets that Gaussian (small groups, where VAEs over-fit)",
    )
    add("--no-progress", action="store_true", help="no progress bars")
    # Every flag's default is the `PriorSettings` field's (shown by --help).
    parser.set_defaults(**{name: getattr(PriorSettings, name) for name in _FLAG_FIELDS})
    parser.set_defaults(**{flag: getattr(PRIOR_VAE, field) for flag, field in _VAE_FLAGS.items()})
    args = parser.parse_args(argv)
    if args.sources < 1 or args.source_steps < 1 or args.vae_steps < 1 or args.latent_dim < 1:
        parser.error("--sources, --source-steps, --vae-steps and --latent-dim must be >= 1")
    return args


def source_config(settings: PriorSettings, seed: int):
    """The deterministic source run of seed `seed`."""
    config = get_config(settings.backbone, settings.preset)
    backbone, data = {}, {}
    if settings.spatial_dims:
        backbone["spatial_dims"] = settings.spatial_dims
        if settings.spatial_dims == 2 and not settings.patch:
            data["patch_shape"] = tuple(2 * p for p in config.data.patch_shape[:2])
    if settings.features:
        backbone["features"] = tuple(settings.features)
    if settings.patch:
        data["patch_shape"] = tuple(settings.patch)
    if settings.source_data_dir:
        data["data_dir"] = str(settings.source_data_dir.absolute())
    else:
        from vi_seg_jax.data.default import DefaultDataset, ensure_default_dataset

        lesions = DefaultDataset(domain="lesions", num_cases=20)
        data["data_dir"] = str(ensure_default_dataset(lesions, progress=settings.progress))
    # Source networks only need to learn the source domain: every case but one for validation
    # (and one held out, never used) trains them.
    data.update(test_size=1, validation_size=1, train_size=None)
    schedule = {"steps": settings.source_steps, "patience_epochs": None}
    return with_overrides(
        config,
        backbone=backbone,
        data=data,
        schedule=schedule,
        method={"method": "deterministic"},
        seed=seed,
    )


def train_sources(settings: PriorSettings) -> list[Path]:
    from vi_seg_jax.train.loop import train_and_evaluate

    runs = []
    for seed in range(settings.sources):
        workdir = settings.out.with_name(f"{settings.out.name}.sources") / f"seed{seed}"
        if not (workdir / "summary.json").exists():
            config = source_config(settings, seed)
            print(f"source network {seed + 1}/{settings.sources} -> {workdir}", file=sys.stderr)
            resume = (workdir / "checkpoints").is_dir()
            train_and_evaluate(config, workdir, resume=resume, progress=settings.progress)
        runs.append(workdir)
    return runs


def settings_from_args(args: argparse.Namespace) -> PriorSettings:
    """The `PriorSettings` of the parsed flags."""
    values = {name: getattr(args, name) for name in ("out", *_FLAG_FIELDS)}
    for name in ("features", "patch", "source_runs"):  # nargs="+": lists
        values[name] = tuple(values[name]) if values[name] else None
    vae = dataclasses.replace(
        PRIOR_VAE, **{field: getattr(args, flag) for flag, field in _VAE_FLAGS.items()}
    )
    return PriorSettings(**values, vae=vae, progress=not args.no_progress)


def main(argv: Sequence[str] | None = None) -> int:
    settings = settings_from_args(parse_args(argv))
    print(build_prior(settings))
    print(f"prior written to {settings.out}/", file=sys.stderr)
    return 0


def build_prior(settings: PriorSettings) -> str:
    """Trains (or reuses) the source runs, then the kernel VAEs, and writes the prior folder.

    Returns:
      A Markdown table, per layer group, of the held-out fits and the prior kept.

    Raises:
      DataError: a source run of another backbone or method, source runs of mixed
        dimensions, or a layer group with too few usable kernels.
    """
    import jax

    from vi_seg_jax.bayes.guide import bayesian_paths
    from vi_seg_jax.dwp.kernels import collect_kernels, default_groups
    from vi_seg_jax.dwp.prior import write_prior
    from vi_seg_jax.dwp.vae_training import train_vae
    from vi_seg_jax.errors import DataError
    from vi_seg_jax.methods import Deterministic
    from vi_seg_jax.predict import load_trained

    runs = settings.source_runs or train_sources(settings)
    models = [load_trained(run) for run in runs]
    for run, model in zip(runs, models, strict=True):
        if model.config.backbone.name != settings.backbone or not isinstance(
            model.spec.strategy, Deterministic
        ):
            raise DataError(
                run,
                f"is a {model.config.backbone.name} {model.config.method.method} run; "
                f"the prior needs deterministic {settings.backbone} runs",
            )
    dims = {m.config.backbone.spatial_dims for m in models}
    if len(dims) != 1:
        raise DataError(runs[0], f"source runs mix spatial dims {sorted(dims)}")
    spatial_dims = dims.pop()
    vae_config = dataclasses.replace(settings.vae, spatial_dims=spatial_dims)
    params = [jax.device_get(m.state.params) for m in models]
    groups = default_groups(settings.backbone, bayesian_paths(params[0]))
    kernels = collect_kernels(params, groups)
    vaes, reports = {}, {}
    keys = jax.random.split(jax.random.key(settings.seed), len(groups))
    for key, name in zip(keys, groups, strict=True):
        rows = kernels[name]
        if len(rows) < 20:
            raise DataError(runs[0], f"layer group {name} has only {len(rows)} usable kernels")
        print(f"kernel VAE {name}: {len(rows)} kernels", file=sys.stderr)
        vae_params, report = train_vae(rows, vae_config, key, progress=settings.progress)
        vaes[name] = (vae_params, vae_config)
        reports[name] = {k: _plain(v) for k, v in report.items()}
    gaussian_groups = {} if settings.always_vae else gaussian_fallbacks(reports, groups)
    reports["sources"] = [str(Path(run).absolute()) for run in runs]
    write_prior(
        settings.out,
        backbone=settings.backbone,
        spatial_dims=spatial_dims,
        groups=groups,
        kernels=kernels,
        vaes=vaes,
        reports=reports,
        gaussian_groups=gaussian_groups,
    )
    return _table(reports, groups, gaussian_groups)


def _plain(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _count(report: dict) -> int:
    return int(
        sum(report.get(k, 0) for k in ("train_kernels", "validation_kernels", "heldout_kernels"))
    )


def gaussian_fallbacks(reports: dict, groups: dict) -> dict[str, float]:
    """Group → σ² for each group whose VAE does not beat N(0, σ²) on held-out kernels."""
    return {
        name: reports[name]["normal_variance"]
        for name in groups
        if reports[name]["heldout_neg_elbo"] >= reports[name]["heldout_normal_neg_log_lik"]
    }


def _table(reports: dict, groups: dict, gaussian_groups: dict) -> str:
    lines = [
        "| group | layers | kernels | held-out −ELBO (VAE) | −log N(0, σ²) | prior used |",
        "|---|---|---|---|---|---|",
    ]
    for name, paths in groups.items():
        r = reports[name]
        vae, normal = r["heldout_neg_elbo"], r["heldout_normal_neg_log_lik"]
        used = "N(0, σ²)" if name in gaussian_groups else "VAE"
        lines.append(f"| {name} | {len(paths)} | {_count(r)} | {vae:.2f} | {normal:.2f} | {used} |")
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(main)
