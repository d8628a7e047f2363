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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from experiments.common import add_device_flags, distributed_config, make_parser, run_cli
from experiments.configs import PRESETS, get_config
from vi_seg_jax.backbones import BACKBONES
from vi_seg_jax.data.augment import AUGMENTATIONS
from vi_seg_jax.methods import METHODS
from vi_seg_jax.parallel import data_mesh, initialize_distributed
from vi_seg_jax.task import TASKS
from vi_seg_jax.train.config import DWP_INIT_LOG_VAR, PRIORS, TrainConfig, dropout_for
from vi_seg_jax.train.loop import TrainingError, train_and_evaluate
from vi_seg_jax.train.metrics_log import TENSORBOARD_DIR


def _absolute(path: str) -> str:
    return str(Path(path).absolute())


@dataclasses.dataclass(frozen=True)
class Flag:
    """One command-line flag and the config fields it sets."""

    name: str
    help: str
    field: str | None = None  # the "section.field" it sets to its value (through `convert`)
    convert: Callable[[Any], Any] = lambda value: value
    # When setting `field` is not all: (the config so far, as a dict; the value) ->
    # {"section.field": value, ...}.
    update: Callable[[dict, Any], dict[str, Any]] | None = None
    options: dict = dataclasses.field(default_factory=dict)  # argparse's type, nargs, ...

    def updates(self, values: dict, value: Any) -> dict[str, Any]:
        if self.update is None:
            return {self.field: self.convert(value)}
        return self.update(values, value)


def _method(values: dict, name: str) -> dict[str, Any]:
    dropout = dropout_for(name, values["backbone"]["dropout_rate"])
    return {"method.method": name, "backbone.dropout_rate": dropout}


def _prior(values: dict, kind: str) -> dict[str, Any]:
    if kind == "normal":
        return {"prior.kind": kind}
    return {"prior.kind": kind, "method.guide.init_log_var": DWP_INIT_LOG_VAR}


def _spatial_dims(values: dict, dims: int) -> dict[str, Any]:
    patch = values["data"]["patch_shape"]
    if dims == 2 and len(patch) == 3:  # 2D slices: twice the 3D patch's in-plane size
        patch = (2 * patch[0], 2 * patch[1])
    return {"backbone.spatial_dims": dims, "data.patch_shape": tuple(patch)}


def _epochs(values: dict, epochs: int) -> dict[str, Any]:
    return {"schedule.steps": epochs * values["schedule"]["steps_per_epoch"]}


# Applied in this order, each flag only when given; the preset gives every default.
FLAGS = (
    Flag(
        "--task",
        "wt: whole tumour vs rest (the paper); regions: WT/TC/ET sigmoids",
        "likelihood.task",
        options={"choices": tuple(TASKS)},
    ),
    Flag(
        "--method",
        "vi: variational posterior; deterministic: MAP; mc_dropout (dropout 0.1); ensemble",
        "method.method",
        update=_method,
        options={"choices": tuple(METHODS)},
    ),
    Flag(
        "--estimator",
        "VI gradient estimator: local reparameterisation or full weight sampling",
        "method.estimator",
        options={"choices": ("lrt", "full")},
    ),
    Flag(
        "--particles",
        "Monte Carlo samples of the data term per step",
        "method.num_particles",
        options={"type": int},
    ),
    Flag(
        "--prior-dir",
        "a deep weight prior folder (python -m experiments.train_prior)",
        "prior.directory",
        _absolute,
    ),
    Flag(
        "--prior",
        "prior over the Bayesian kernels: normal = N(0, prior_scale^2); dwp = the "
        "deep weight prior of --prior-dir (its posterior starts at log-variance -10, as in its "
        "code)",
        "prior.kind",
        update=_prior,
        options={"choices": PRIORS},
    ),
    Flag(
        "--init-log-var",
        "initial log-variance of the posterior (preset: -5; -10 with --prior dwp)",
        "method.guide.init_log_var",
        options={"type": float},
    ),
    Flag(
        "--dwp-init",
        "initialise the posterior means with samples of the deep weight prior",
        "prior.init_from_prior",
        options={"action": "store_true"},
    ),
    Flag(
        "--dwp-train-encoder",
        "train the deep weight prior's encoders jointly with the "
        "posterior, tightening the KL bound (Algorithm 1); the decoders stay frozen",
        "prior.train_encoder",
        options={"action": "store_true"},
    ),
    Flag(
        "--kl-weight",
        "weight of the KL term (1: the ELBO; below 1: a tempered posterior)",
        "prior.kl_weight",
        options={"type": float},
    ),
    Flag(
        "--kl-warmup-epochs",
        "epochs of linear KL warm-up",
        "prior.kl_warmup_epochs",
        options={"type": int},
    ),
    Flag(
        "--init-from",
        "start from the weights of this trained deterministic run",
        "optimizer.init_from",
        _absolute,
    ),
    Flag(
        "--freeze",
        "top-level layers never updated (e.g. down_3 down_4), for fine-tuning",
        "optimizer.frozen_layers",
        tuple,
        options={"nargs": "+", "metavar": "LAYER"},
    ),
    Flag(
        "--learning-rate", "Adam learning rate", "optimizer.learning_rate", options={"type": float}
    ),
    Flag(
        "--data-dir",
        "BraTS 2018-2024 or MSD Task01 folder (default: the embedded synthetic dataset)",
        "data.data_dir",
        _absolute,
    ),
    Flag(
        "--test-size",
        "fixed, seeded test cases held out, never trained or validated on "
        "(default: 20%% of a dataset, 0 allowed; 10 on the embedded one)",
        "data.test_size",
        options={"type": int},
    ),
    Flag(
        "--validation-size",
        "fixed, seeded validation cases: early stopping, best checkpoint "
        "(default: 10%% of a dataset, at least 1; 5 on the embedded one)",
        "data.validation_size",
        options={"type": int},
    ),
    Flag(
        "--train-size",
        "training cases (default: every case not held out; 20 on the embedded "
        "dataset; paper protocol: 5, 10, 15 or 20)",
        "data.train_size",
        options={"type": int},
    ),
    Flag(
        "--train-repeat",
        "which seeded draw of the training cases (0, 1, ...)",
        "data.train_repeat",
        options={"type": int},
    ),
    Flag(
        "--spatial-dims",
        "3D volumes or 2D axial slices",
        "backbone.spatial_dims",
        update=_spatial_dims,
        options={"type": int, "choices": (2, 3)},
    ),
    Flag(
        "--features",
        "channels per level, e.g. 16 32 64 128",
        "backbone.features",
        tuple,
        options={"type": int, "nargs": "+", "metavar": "C"},
    ),
    Flag(
        "--patch",
        "training patch size (3 numbers for 3D, 2 for 2D)",
        "data.patch_shape",
        tuple,
        options={"type": int, "nargs": "+", "metavar": "N"},
    ),
    Flag("--batch-size", "patches per step", "data.batch_size", options={"type": int}),
    Flag(
        "--unbiased-weights",
        "weight each voxel by the inverse of its chance to be sampled, so "
        "that the data term is unbiased despite tumour oversampling (see the README)",
        "data.unbiased_weights",
        options={"action": argparse.BooleanOptionalAction},
    ),
    Flag(
        "--augment",
        "on-device augmentation of each batch: light = mirroring and intensity jitter; default "
        "= nnU-Net's mirroring, rotation, scaling, elastic, gamma, intensity and noise (quick "
        "preset: none; paper: default)",
        "data.augment",
        options={"choices": tuple(AUGMENTATIONS)},
    ),
    Flag(
        "--steps-per-epoch",
        "steps counted as one epoch (validation, checkpoints, decay, patience)",
        "schedule.steps_per_epoch",
        options={"type": int},
    ),
    Flag("--epochs", "training length in epochs", update=_epochs, options={"type": int}),
    Flag(
        "--steps",
        "training length in steps (overrides --epochs)",
        "schedule.steps",
        options={"type": int},
    ),
    Flag(
        "--validation-samples",
        "Monte Carlo samples per validation volume",
        "schedule.validation_samples",
        options={"type": int},
    ),
    Flag(
        "--patience",
        "early stopping patience in epochs (0 disables)",
        "schedule.patience_epochs",
        lambda epochs: epochs or None,
        options={"type": int},
    ),
    Flag(
        "--precision",
        "bf16: bfloat16 forward/backward passes, float32 weights, optimiser and loss",
        "precision",
        options={"choices": ("fp32", "bf16")},
    ),
)


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = make_parser("experiments.train", __doc__)
    parser.epilog = "A flag left out takes the preset's value (experiments/configs.py)."
    add = parser.add_argument
    add("--backbone", choices=sorted(BACKBONES), default="unet", help="network architecture")
    add(
        "--preset",
        choices=PRESETS,
        default="quick",
        help="quick: minutes on a CPU; paper: the paper code's setup, for a GPU",
    )
    add("--workdir", help="output folder (default: runs/<backbone>-<method>-<preset>-seed<seed>)")
    for flag in FLAGS:
        add(flag.name, help=flag.help, **flag.options)
    add("--seed", type=int, default=0, help="training seed (the data split has its own fixed seed)")
    add_device_flags(parser)
    add("--resume", action="store_true", help="continue from the workdir's last checkpoint")
    add("--no-progress", action="store_true", help="no progress bar")
    add(
        "--no-tensorboard",
        action="store_true",
        help="no TensorBoard event files (written to WORKDIR/tensorboard when it is installed)",
    )
    return parser, parser.parse_args(argv)


def _given(args: argparse.Namespace, flag: Flag) -> Any:
    value = getattr(args, flag.name[2:].replace("-", "_"))
    return None if value is False else value  # store_true flags left off change nothing


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The preset, with each given flag applied in `FLAGS` order; checked once, at the end."""
    values = get_config(args.backbone, args.preset).to_dict()
    values.update(seed=args.seed, devices=args.devices)
    for flag in FLAGS:
        value = _given(args, flag)
        if value is None:
            continue
        for path, new in flag.updates(values, value).items():
            *sections, name = path.split(".")
            target = values
            for section in sections:
                target = target[section]
            target[name] = new
    try:
        return TrainConfig.from_dict(values)
    except ValueError as error:
        raise ValueError(flag_message(str(error))) from None


def flag_message(message: str) -> str:
    """A config error in the words of the command line: each `section.field` as its flag."""
    for flag in FLAGS:
        if flag.field is not None:
            message = message.replace(f"`{flag.field}`", flag.name)
    return message.replace("`", "")


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
        or f"runs/{config.backbone.name}-{method}{'-dwp' if config.prior.kind == 'dwp' else ''}"
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
