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
- DWP: variational, deep weight prior learnt on the source networks' kernels.

The source networks and the prior come from `experiments.train_prior` (built into
`OUT/prior` on the synthetic lesions domain unless `--prior-dir` is given). Writes
`OUT/results.csv` (one row per run), `OUT/dice.md`, `OUT/iou.md` (mean ± std, %) and
`OUT/dice_vs_train_size.png`. Finished runs are reused when the command is rerun.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from experiments.common import run_cli
from experiments.configs import get_config, with_overrides
from vi_seg_jax.backbones import get_backbone

VARIANTS = ("RI", "PR", "PRf", "VI", "DWP")
# Per preset: (spatial dims, patch, batch, steps) of every target run.
_PRESETS = {"quick": (2, (64, 64), 8, 150), "paper": (3, (128, 128, 128), 1, 20_000)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.transfer",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
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
    add("--vae-steps", type=int, default=3000, help="VAE steps per layer group (new prior)")
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
    method = {"method": "vi" if variant in ("VI", "DWP") else "deterministic"}
    top: dict = {"seed": repeat}
    if variant in ("PR", "PRf"):
        top["init_from"] = str(source_run.absolute())
    if variant == "DWP":
        top.update(prior="dwp", prior_dir=str(prior.absolute()))
        method["guide"] = dataclasses.replace(config.method.guide, init_log_var=-10.0)
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
        schedule={"steps": args.steps or steps, "patience_epochs": None},
        **top,
    )
    if variant == "PRf":
        net = get_backbone(config.backbone.name, num_classes=2, **config.backbone.kwargs())
        config = dataclasses.replace(config, frozen_layers=_middle_layers(net.depth))
    return config


def _middle_layers(depth: int) -> tuple[str, ...]:
    """Encoder stages from the second resolution level on, and the bottleneck."""
    return tuple(f"down_{k}" for k in range(3, 2 * depth + 1)) + tuple(
        f"bottleneck{suffix}" for suffix in ("", "_1", "_2", "_3")
    )


def build_prior(args: argparse.Namespace) -> Path:
    from experiments import train_prior

    if args.prior_dir:
        return args.prior_dir
    prior = args.out / "prior"
    if not (prior / "manifest.json").exists():
        dims, patch, *_ = _PRESETS[args.preset]
        argv = ["--backbone", args.backbone, "--preset", args.preset, "--out", str(prior)]
        argv += ["--spatial-dims", str(dims), "--patch", *map(str, patch)]
        argv += ["--source-steps", str(args.source_steps), "--vae-steps", str(args.vae_steps)]
        if args.features:
            argv += ["--features", *map(str, args.features)]
        if args.source_data_dir:
            argv += ["--source-data-dir", str(args.source_data_dir)]
        if args.no_progress:
            argv.append("--no-progress")
        train_prior.main(argv)
    return prior


def test_scores(workdir: Path, samples: int) -> tuple[float, float]:
    """Mean whole-tumour Dice and IoU over the run's test cases."""
    import numpy as np

    from vi_seg_jax.data.discovery import discover_cases
    from vi_seg_jax.metrics import dice, iou
    from vi_seg_jax.predict import Predictor, load_trained, read_splits

    model = load_trained(workdir)
    splits = read_splits(workdir)
    cases = [c for c in discover_cases(splits["root"]).cases if c.case_id in set(splits["test"])]
    deterministic = model.config.method.method == "deterministic"
    predictor = Predictor(model, num_samples=1 if deterministic else samples)
    dices, ious = [], []
    for case in cases:
        out = predictor.predict_case(case, progress=False)
        predicted, truth = out.labels > 0, out.truth > 0
        dices.append(dice(predicted, truth))
        ious.append(iou(predicted, truth))
    return float(np.mean(dices)), float(np.mean(ious))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from tqdm.auto import tqdm

    from vi_seg_jax.train.loop import train_and_evaluate

    args.out.mkdir(parents=True, exist_ok=True)
    prior = build_prior(args)
    runs = [
        (variant, size, repeat)
        for repeat in range(args.repeats)
        for size in args.train_sizes
        for variant in args.variants
    ]
    rows = []
    for variant, size, repeat in tqdm(runs, desc="transfer runs", disable=args.no_progress or None):
        workdir = args.out / "runs" / f"{variant}-n{size}-r{repeat}"
        if not (workdir / "summary.json").exists():
            config = target_config(args, variant, size, repeat, prior)
            resume = (workdir / "checkpoints").is_dir()
            train_and_evaluate(config, workdir, resume=resume, progress=False, tensorboard=False)
        dice_value, iou_value = test_scores(workdir, args.samples)
        rows.append(
            {"variant": variant, "train_size": size, "repeat": repeat}
            | {"dice": dice_value, "iou": iou_value}
        )
        write_results(args.out, rows)
    print((args.out / "dice.md").read_text())
    print(f"results in {args.out}/ (results.csv, dice.md, iou.md, plot)", file=sys.stderr)
    return 0


def write_results(out: Path, rows: list[dict]) -> None:
    """CSV of every run, Markdown tables of mean ± std (%) and the Dice plot."""
    import numpy as np

    from vi_seg_jax.plots import transfer_figure

    tmp = out / ".results.csv.tmp"
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out / "results.csv")
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    sizes = sorted({r["train_size"] for r in rows})
    for metric in ("dice", "iou"):
        lines = ["| variant | " + " | ".join(f"n = {s}" for s in sizes) + " |"]
        lines.append("|---|" + "---|" * len(sizes))
        for variant in variants:
            cells = []
            for size in sizes:
                values = [
                    100 * r[metric]
                    for r in rows
                    if r["variant"] == variant and r["train_size"] == size
                ]
                cells.append(
                    f"{np.mean(values):.1f} ± {np.std(values):.1f} ({len(values)})"
                    if values
                    else ""
                )
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        (out / f"{metric}.md").write_text("\n".join(lines) + "\n")
    transfer_figure(out / "dice_vs_train_size.png", rows)


if __name__ == "__main__":
    run_cli(main)
