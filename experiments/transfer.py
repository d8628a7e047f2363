"""The deep-weight-prior transfer study: source domain → prior → target at small train sizes.

    python -m experiments.transfer --out transfer/            # quick: 2D U-Net, CPU
    python -m experiments.transfer --preset paper --repeats 3 --data-dir BRATS --out transfer/

Variants (the DWP paper's baselines), each trained on the target (the embedded synthetic
tumour data, or `--data-dir`) for every train size and repeat, and scored by Dice and IoU
of the whole tumour on the same fixed test cases:

- RI: deterministic network from random initialisation;
- PR: deterministic, initialised from a source network (pretrained) and fine-tuned;
- PRf: as PR with the middle of the encoder frozen (down stages from the second level on,
  and the bottleneck);
- VI: variational, N(0, 1) prior;
- DWP: variational, deep weight prior learnt on the source networks' kernels;
- DWP-E: as DWP, with the prior's encoders trained jointly with the posterior
  (Algorithm 1's option; the decoders stay frozen).

The source networks and the prior come from `experiments.train_prior` (built into
`OUT/prior` on the synthetic lesions domain unless `--prior-dir` is given). Writes
`OUT/results.csv` (one row per run), `OUT/dice.md`, `OUT/iou.md` (mean ± std, %) and
`OUT/dice_vs_train_size.png`. Finished runs are reused when the command is rerun.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from experiments.common import make_parser, run_cli
from experiments.configs import get_config, with_overrides
from experiments.studies import mean_std_table, run_grid, write_csv
from vi_seg_jax.backbones import get_backbone

VARIANTS = ("RI", "PR", "PRf", "VI", "DWP", "DWP-E")
# Per preset: (spatial dims, patch, batch, steps) of every target run.
_PRESETS = {"quick": (2, (64, 64), 8, 150), "paper": (3, (128, 128, 128), 1, 20_000)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = make_parser("experiments.transfer", __doc__)
    add = parser.add_argument
    add("--out", required=True, type=Path, help="output folder")
    add("--backbone", default="unet", choices=("unet", "vnet", "fcn"), help="architecture")
    add("--preset", default="quick", choices=tuple(_PRESETS), help="quick: 2D, CPU minutes")
    add("--data-dir", type=Path, help="target dataset (default: embedded synthetic tumours)")
    add("--prior-dir", type=Path, help="a prior folder (default: build one into OUT/prior)")
    add("--source-data-dir", type=Path, help="source dataset (default: synthetic lesions)")
    add("--train-sizes", type=int, nargs="+", default=[5, 10, 15, 20], help="target cases")
    add("--repeats", type=int, default=1, help="seeded draws of the training cases per size")
    add("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="what to run")
    add("--steps", type=int, help="training steps per run (preset default)")
    add("--features", type=int, nargs="+", help="channels per level (preset default)")
    add("--test-size", type=int, default=10, help="fixed target test cases")
    add("--validation-size", type=int, default=5, help="fixed target validation cases")
    add("--source-steps", type=int, default=200, help="steps per source network (new prior)")
    add("--vae-steps", type=int, default=20_000, help="VAE steps per layer group (new prior)")
    add("--samples", type=int, default=4, help="Monte Carlo samples at test time (VI, DWP)")
    add("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if min(args.train_sizes) < 1 or args.repeats < 1:
        parser.error("--train-sizes and --repeats must be >= 1")
    return args


def target_config(args: argparse.Namespace, variant: str, size: int, repeat: int, prior: Path):
    dims, patch, batch, steps = _PRESETS[args.preset]
    config = get_config(args.backbone, args.preset)
    source_run = prior.with_name(f"{prior.name}.sources") / "seed0"
    method = {"method": "vi" if variant in ("VI", "DWP", "DWP-E") else "deterministic"}
    optimizer = {}
    if variant in ("PR", "PRf"):
        optimizer["init_from"] = str(source_run.absolute())
    data = {"patch_shape": patch, "batch_size": batch, "train_size": size}
    data.update(train_repeat=repeat, test_size=args.test_size, validation_size=args.validation_size)
    if args.data_dir:
        data["data_dir"] = str(args.data_dir.absolute())
    backbone = {"spatial_dims": dims}
    if args.features:
        backbone["features"] = tuple(args.features)
    config = with_overrides(
        config,
        backbone=backbone,
        method=method,
        data=data,
        optimizer=optimizer,
        schedule={"steps": args.steps or steps, "patience_epochs": None},
        seed=repeat,
    )
    if variant in ("DWP", "DWP-E"):
        config = config.with_deep_weight_prior(
            str(prior.absolute()), train_encoder=variant == "DWP-E"
        )
    if variant == "PRf":
        net = get_backbone(config.backbone.name, num_classes=2, **config.backbone.kwargs())
        config = with_overrides(config, optimizer={"frozen_layers": _middle_layers(net.depth)})
    return config


def _middle_layers(depth: int) -> tuple[str, ...]:
    """Encoder stages from the second resolution level on, and the bottleneck."""
    return tuple(f"down_{k}" for k in range(3, 2 * depth + 1)) + tuple(
        f"bottleneck{suffix}" for suffix in ("", "_1", "_2", "_3")
    )


def build_prior(args: argparse.Namespace) -> Path:
    """`--prior-dir`, or the prior built into `OUT/prior` (reused when already there)."""
    from experiments.train_prior import PRIOR_VAE, PriorSettings
    from experiments.train_prior import build_prior as train_prior

    if args.prior_dir:
        return args.prior_dir
    prior = args.out / "prior"
    if not (prior / "manifest.json").exists():
        dims, patch, *_ = _PRESETS[args.preset]
        settings = PriorSettings(
            out=prior,
            backbone=args.backbone,
            preset=args.preset,
            spatial_dims=dims,
            features=tuple(args.features) if args.features else None,
            patch=patch,
            source_data_dir=args.source_data_dir,
            source_steps=args.source_steps,
            vae=dataclasses.replace(PRIOR_VAE, steps=args.vae_steps),
            progress=not args.no_progress,
        )
        print(train_prior(settings))
    return prior


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    prior = build_prior(args)
    run_grid(
        args.variants,
        args.train_sizes,
        args.repeats,
        name_key="variant",
        config_for=lambda variant, size, repeat: target_config(args, variant, size, repeat, prior),
        runs_dir=args.out / "runs",
        samples=args.samples,
        after_each=lambda rows: write_results(args.out, rows),
        desc="transfer runs",
        progress=not args.no_progress,
    )
    print((args.out / "dice.md").read_text())
    print(f"results in {args.out}/ (results.csv, dice.md, iou.md, plot)", file=sys.stderr)
    return 0


def write_results(out: Path, rows: list[dict]) -> None:
    """CSV of every run, Markdown tables of mean ± std (%) and the Dice plot."""
    from vi_seg_jax.plots import transfer_figure

    write_csv(out / "results.csv", rows)
    for metric in ("dice", "iou"):
        table = mean_std_table(
            rows, row_key="variant", column_key="train_size", metric=metric, row_order=VARIANTS
        )
        (out / f"{metric}.md").write_text(table)
    transfer_figure(out / "dice_vs_train_size.png", rows)


if __name__ == "__main__":
    run_cli(main)
