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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = make_parser("experiments.train_prior", __doc__)
    add = parser.add_argument
    add("--backbone", choices=sorted(BACKBONES), default="unet", help="target architecture")
    add("--out", required=True, type=Path, help="the prior folder to write")
    add("--preset", choices=PRESETS, default="quick", help="configuration of the source runs")
    add("--spatial-dims", type=int, choices=(2, 3), help="2D or 3D networks (preset default)")
    add("--features", type=int, nargs="+", help="channels per level (preset default)")
    add("--patch", type=int, nargs="+", help="training patch of the source runs")
    add("--source-data-dir", type=Path, help="source dataset (default: synthetic lesions)")
    add("--source-runs", type=Path, nargs="+", help="trained deterministic runs to reuse")
    add("--sources", type=int, default=2, help="source networks to train (seeds 0..S-1)")
    add("--source-steps", type=int, default=200, help="training steps per source network")
    add("--vae-steps", type=int, default=20_000, help="VAE training steps per layer group")
    add("--latent-dim", type=int, default=6, help="VAE latent size")
    # The DWP code's Adam 5e-4 with batch 128 under-fits at CPU step budgets (measured on
    # 65k kernels: held-out −ELBO −23.0 nats after 10k steps, −25.7 with 2e-3 / 512 / 20k).
    add("--vae-learning-rate", type=float, default=2e-3, help="Adam step size of the VAEs")
    add("--vae-batch-size", type=int, default=512, help="kernels per VAE step")
    add("--seed", type=int, default=0, help="seed of the VAEs")
    add(
        "--always-vae",
        action="store_true",
        help="keep every group's VAE; by default a group whose VAE fits its held-out kernels "
        "worse than N(0, σ²) gets that Gaussian (small groups, where VAEs over-fit)",
    )
    add("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.sources < 1 or args.source_steps < 1 or args.vae_steps < 1 or args.latent_dim < 1:
        parser.error("--sources, --source-steps, --vae-steps and --latent-dim must be >= 1")
    return args


def source_config(args: argparse.Namespace, seed: int):
    """The deterministic source run of seed `seed`."""
    config = get_config(args.backbone, args.preset)
    backbone, data = {}, {}
    if args.spatial_dims:
        backbone["spatial_dims"] = args.spatial_dims
        if args.spatial_dims == 2 and not args.patch:
            data["patch_shape"] = tuple(2 * p for p in config.data.patch_shape[:2])
    if args.features:
        backbone["features"] = tuple(args.features)
    if args.patch:
        data["patch_shape"] = tuple(args.patch)
    if args.source_data_dir:
        data["data_dir"] = str(args.source_data_dir.absolute())
    else:
        from vi_seg_jax.data.default import DefaultDataset, ensure_default_dataset

        lesions = DefaultDataset(domain="lesions", num_cases=20)
        data["data_dir"] = str(ensure_default_dataset(lesions, progress=not args.no_progress))
    # Source networks only need to learn the source domain: every case but one for validation
    # (and one held out, never used) trains them.
    data.update(test_size=1, validation_size=1, train_size=None)
    schedule = {"steps": args.source_steps, "patience_epochs": None}
    return with_overrides(
        config,
        backbone=backbone,
        data=data,
        schedule=schedule,
        method={"method": "deterministic"},
        seed=seed,
    )


def train_sources(args: argparse.Namespace) -> list[Path]:
    from vi_seg_jax.train.loop import train_and_evaluate

    runs = []
    for seed in range(args.sources):
        workdir = args.out.with_name(f"{args.out.name}.sources") / f"seed{seed}"
        if not (workdir / "summary.json").exists():
            config = source_config(args, seed)
            print(f"source network {seed + 1}/{args.sources} -> {workdir}", file=sys.stderr)
            resume = (workdir / "checkpoints").is_dir()
            train_and_evaluate(config, workdir, resume=resume, progress=not args.no_progress)
        runs.append(workdir)
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    from vi_seg_jax.bayes.guide import bayesian_paths
    from vi_seg_jax.dwp.kernels import collect_kernels, default_groups
    from vi_seg_jax.dwp.prior import write_prior
    from vi_seg_jax.dwp.vae import VAEConfig
    from vi_seg_jax.dwp.vae_training import train_vae
    from vi_seg_jax.errors import DataError
    from vi_seg_jax.methods import Deterministic
    from vi_seg_jax.predict import load_trained

    runs = args.source_runs or train_sources(args)
    models = [load_trained(run) for run in runs]
    for run, model in zip(runs, models, strict=True):
        if model.config.backbone.name != args.backbone or not isinstance(
            model.spec.strategy, Deterministic
        ):
            raise DataError(
                run,
                f"is a {model.config.backbone.name} {model.config.method.method} run; "
                f"the prior needs deterministic {args.backbone} runs",
            )
    dims = {m.config.backbone.spatial_dims for m in models}
    if len(dims) != 1:
        raise DataError(runs[0], f"source runs mix spatial dims {sorted(dims)}")
    spatial_dims = dims.pop()
    params = [jax.device_get(m.state.params) for m in models]
    groups = default_groups(args.backbone, bayesian_paths(params[0]))
    kernels = collect_kernels(params, groups)
    vaes, reports = {}, {}
    keys = jax.random.split(jax.random.key(args.seed), len(groups))
    for key, name in zip(keys, groups, strict=True):
        rows = kernels[name]
        if len(rows) < 20:
            raise DataError(runs[0], f"layer group {name} has only {len(rows)} usable kernels")
        config = VAEConfig(
            spatial_dims=spatial_dims,
            latent_dim=args.latent_dim,
            steps=args.vae_steps,
            learning_rate=args.vae_learning_rate,
            batch_size=args.vae_batch_size,
        )
        print(f"kernel VAE {name}: {len(rows)} kernels", file=sys.stderr)
        vae_params, report = train_vae(rows, config, key, progress=not args.no_progress)
        vaes[name] = (vae_params, config)
        reports[name] = {k: _plain(v) for k, v in report.items()}
    gaussian_groups = {} if args.always_vae else gaussian_fallbacks(reports, groups)
    reports["sources"] = [str(Path(run).absolute()) for run in runs]
    write_prior(
        args.out,
        backbone=args.backbone,
        spatial_dims=spatial_dims,
        groups=groups,
        kernels=kernels,
        vaes=vaes,
        reports=reports,
        gaussian_groups=gaussian_groups,
    )
    print(_table(reports, groups, gaussian_groups))
    print(f"prior written to {args.out}/", file=sys.stderr)
    return 0


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
