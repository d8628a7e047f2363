"""Train a Bayesian segmentation network.

    python -m experiments.train --backbone unet                  # embedded synthetic data
    python -m experiments.train --backbone vnet --data-dir /data/BraTS2021 --preset paper

Writes to the workdir: config.json, splits.json, metrics.jsonl, summary.json,
validation.png and Orbax checkpoints (last K and best by validation Dice). `--resume`
continues a run from its last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from experiments.common import add_device_flags, distributed_config, make_parser, run_cli
from experiments.configs import PRESETS, get_config, with_overrides
from vi_seg_jax.backbones import BACKBONES
from vi_seg_jax.methods import METHODS
from vi_seg_jax.parallel import data_mesh, initialize_distributed
from vi_seg_jax.task import TASKS
from vi_seg_jax.train.config import TrainConfig
from vi_seg_jax.train.loop import TrainingError, train_and_evaluate
from vi_seg_jax.train.metrics_log import TENSORBOARD_DIR


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = make_parser("experiments.train", __doc__)
    add = parser.add_argument
    add("--backbone", choices=sorted(BACKBONES), default="unet", help="network architecture")
    add(
        "--preset",
        choices=PRESETS,
        default="quick",
        help="quick: minutes on a CPU; paper: the paper code's setup, for a GPU",
    )
    add(
        "--data-dir",
        help="BraTS 2018-2024 or MSD Task01 folder (default: the embedded synthetic dataset)",
    )
    add("--workdir", help="output folder (default: runs/<backbone>-<method>-<preset>-seed<seed>)")
    add(
        "--task",
        choices=tuple(TASKS),
        help="wt: whole tumour vs rest (the paper); regions: WT/TC/ET sigmoids",
    )
    add(
        "--method",
        choices=tuple(METHODS),
        help="vi: variational posterior; deterministic: MAP; mc_dropout; ensemble",
    )
    add(
        "--prior",
        choices=("normal", "dwp"),
        help="prior over the Bayesian kernels: normal = N(0, prior_scale^2); dwp = the deep "
        "weight prior of --prior-dir",
    )
    add("--prior-dir", help="a deep weight prior folder (python -m experiments.train_prior)")
    add("--init-from", help="start from the weights of this trained deterministic run")
    add(
        "--freeze",
        nargs="+",
        metavar="LAYER",
        help="top-level layers never updated (e.g. down_3 down_4), for fine-tuning",
    )
    add("--train-repeat", type=int, help="which seeded draw of the training cases (0, 1, ...)")
    add(
        "--init-log-var",
        type=float,
        help="initial log-variance of the posterior (preset: -5; -10 with --prior dwp, as in "
        "the deep weight prior code, whose decoders are tight)",
    )
    add(
        "--dwp-init",
        action="store_true",
        help="initialise the posterior means with samples of the deep weight prior",
    )
    add(
        "--dwp-train-encoder",
        action="store_true",
        help="train the deep weight prior's encoders jointly with the posterior, tightening "
        "the KL bound (Algorithm 1); the decoders stay frozen",
    )
    add(
        "--estimator",
        choices=("lrt", "full"),
        help="VI gradient estimator: local reparameterisation or full weight sampling",
    )
    add("--particles", type=int, help="Monte Carlo samples of the data term per step")
    add(
        "--epochs",
        type=int,
        help="training length in epochs (an epoch is the preset's steps_per_epoch steps)",
    )
    add("--steps", type=int, help="training length in steps (overrides --epochs)")
    add("--train-size", type=int, help="number of training cases (paper protocol: 5, 10, 15 or 20)")
    add(
        "--test-size",
        type=int,
        help="fixed, seeded test cases held out (never trained on or validated on)",
    )
    add(
        "--validation-size",
        type=int,
        help="fixed, seeded validation cases (early stopping, best checkpoint)",
    )
    add(
        "--steps-per-epoch",
        type=int,
        help="steps counted as one epoch (validation, checkpoints, decay, patience)",
    )
    add("--spatial-dims", type=int, choices=(2, 3), help="3D volumes or 2D axial slices")
    add(
        "--patch",
        type=int,
        nargs="+",
        metavar="N",
        help="training patch size (3 numbers for 3D, 2 for 2D)",
    )
    add("--batch-size", type=int, help="patches per step")
    add(
        "--unbiased-weights",
        action=argparse.BooleanOptionalAction,
        help="weight each voxel by the inverse of its chance to be sampled, so that the data "
        "term is unbiased despite tumour oversampling (preset decides; see the README)",
    )
    add("--learning-rate", type=float, help="Adam learning rate")
    add("--kl-warmup-epochs", type=int, help="epochs of linear KL warm-up")
    add("--validation-samples", type=int, help="Monte Carlo samples per validation volume")
    add("--patience", type=int, help="early stopping patience in epochs (0 disables)")
    add(
        "--features", type=int, nargs="+", metavar="C", help="channels per level, e.g. 16 32 64 128"
    )
    add("--seed", type=int, default=0, help="training seed (the data split has its own fixed seed)")
    add(
        "--precision",
        choices=("fp32", "bf16"),
        help="bf16: bfloat16 forward/backward passes, float32 weights, optimiser and loss",
    )
    add_device_flags(parser)
    add("--resume", action="store_true", help="continue from the workdir's last checkpoint")
    add("--no-progress", action="store_true", help="no progress bar")
    add(
        "--no-tensorboard",
        action="store_true",
        help="no TensorBoard event files (written to WORKDIR/tensorboard when it is installed)",
    )
    return parser, parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The preset, with each given flag applied."""
    config = get_config(args.backbone, args.preset)
    backbone, data, schedule, method = {}, {}, {}, {}
    if args.spatial_dims:
        backbone["spatial_dims"] = args.spatial_dims
        if args.spatial_dims == 2 and not args.patch:
            data["patch_shape"] = (2 * config.data.patch_shape[0], 2 * config.data.patch_shape[1])
    if args.features:
        backbone["features"] = tuple(args.features)
    if args.method:
        method["method"] = args.method
        if METHODS[args.method].needs_dropout:
            backbone["dropout_rate"] = 0.1
    if args.estimator:
        method["estimator"] = args.estimator
    if args.particles:
        method["num_particles"] = args.particles
    init_log_var = args.init_log_var
    if init_log_var is None and args.prior == "dwp":
        init_log_var = -10.0
    if init_log_var is not None:
        method["guide"] = dataclasses.replace(config.method.guide, init_log_var=init_log_var)
    if args.data_dir:
        data["data_dir"] = str(Path(args.data_dir).absolute())
    if args.train_size:
        data["train_size"] = args.train_size
    if args.patch:
        data["patch_shape"] = tuple(args.patch)
    if args.test_size is not None:
        data["test_size"] = args.test_size
    if args.validation_size is not None:
        data["validation_size"] = args.validation_size
    if args.steps_per_epoch:
        schedule["steps_per_epoch"] = args.steps_per_epoch
    if args.batch_size:
        data["batch_size"] = args.batch_size
    if args.unbiased_weights is not None:
        data["unbiased_weights"] = args.unbiased_weights
    if args.epochs:
        schedule["steps"] = args.epochs * (args.steps_per_epoch or config.schedule.steps_per_epoch)
    if args.steps:
        schedule["steps"] = args.steps
    if args.validation_samples:
        schedule["validation_samples"] = args.validation_samples
    if args.patience is not None:
        schedule["patience_epochs"] = args.patience or None
    top = {"seed": args.seed, "devices": args.devices}
    if args.precision:
        top["precision"] = args.precision
    if args.task:
        top["likelihood"] = dataclasses.replace(config.likelihood, task=args.task)
    if args.prior:
        top["prior"] = args.prior
    if args.prior_dir:
        top["prior_dir"] = str(Path(args.prior_dir).absolute())
    if args.dwp_init:
        top["dwp_init"] = True
    if args.dwp_train_encoder:
        top["dwp_train_encoder"] = True
    if args.init_from:
        top["init_from"] = str(Path(args.init_from).absolute())
    if args.freeze:
        top["frozen_layers"] = tuple(args.freeze)
    if args.train_repeat is not None:
        data["train_repeat"] = args.train_repeat
    if args.learning_rate:
        top["learning_rate"] = args.learning_rate
    if args.kl_warmup_epochs is not None:
        top["kl_warmup_epochs"] = args.kl_warmup_epochs
    config = with_overrides(
        config, backbone=backbone, data=data, schedule=schedule, method=method, **top
    )
    _check(config)
    return config


def _check(config: TrainConfig) -> None:
    dims = config.backbone.spatial_dims
    if len(config.data.patch_shape) != dims:
        raise ValueError(
            f"--patch needs {dims} numbers for --spatial-dims {dims}, got {list(config.data.patch_shape)}"
        )
    if config.schedule.steps < 1:
        raise ValueError("--steps/--epochs must give at least one step")
    if config.prior == "dwp" and not config.prior_dir:
        raise ValueError(
            "--prior dwp needs --prior-dir (built by python -m experiments.train_prior)"
        )
    if config.prior == "dwp" and not METHODS[config.method.method].has_guide:
        raise ValueError("--prior dwp needs --method vi")
    if config.prior_dir and config.prior != "dwp":
        raise ValueError("--prior-dir is only used with --prior dwp")
    if config.dwp_init and config.prior != "dwp":
        raise ValueError("--dwp-init needs --prior dwp")
    if config.dwp_train_encoder and config.prior != "dwp":
        raise ValueError("--dwp-train-encoder needs --prior dwp")
    if config.data.validation_size < 1:
        raise ValueError("--validation-size must be >= 1 (validation picks the best checkpoint)")
    if config.data.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")


def main(argv: Sequence[str] | None = None) -> int:
    parser, args = parse_args(argv)
    try:
        initialize_distributed(distributed_config(args))
        config = config_from_args(args)
        data_mesh(config.devices, batch_size=config.data.batch_size)
    except ValueError as error:
        parser.error(str(error))
    method = config.method.method
    workdir = Path(
        args.workdir
        or f"runs/{config.backbone.name}-{method}{'-dwp' if config.prior == 'dwp' else ''}"
        f"-{config.preset}-seed{config.seed}"
    )
    try:
        summary = train_and_evaluate(
            config,
            workdir,
            resume=args.resume,
            progress=not args.no_progress,
            tensorboard=not args.no_tensorboard,
        )
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(_summary_table(summary))
    print(f"results in {workdir}/ (summary.json, metrics.jsonl, validation.png, checkpoints/)")
    if (workdir / TENSORBOARD_DIR).is_dir() and not args.no_tensorboard:
        print(f"curves: tensorboard --logdir {workdir / TENSORBOARD_DIR}")
    return 0


def _summary_table(summary: dict) -> str:
    rows = [
        ("backbone / method", f"{summary['backbone']} / {summary['method']}"),
        ("steps", f"{summary['steps']}" + (" (early stop)" if summary["stopped_early"] else "")),
        (
            "final val Dice / IoU",
            f"{summary['final_val_dice']:.4f} / {summary['final_val_iou']:.4f}",
        ),
        ("best val Dice (step)", f"{summary['best_val_dice']:.4f} ({summary['best_step']})"),
        ("wall time", f"{summary['wall_seconds'] / 60:.1f} min"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


if __name__ == "__main__":
    run_cli(main)
