"""Rerun the paper's studies: train-size × backbone Dice/IoU tables, and a method comparison.

    python -m experiments.reproduce --table dice-iou --out results/       # quick: 2D, CPU
    python -m experiments.reproduce --table methods --out results/
    python -m experiments.reproduce --table dice-iou --preset paper --data-dir BRATS --out results/

`--table dice-iou`: for each backbone (U-Net, V-Net, FCN), train size (5/10/15/20) and repeat
(seeded draws of the training cases; the test and validation sets stay fixed), train the
binary whole-tumour task with the paper's likelihood (0.01·CE summed + 0.99·Dice, N(0, 1)
prior, VI) and score Dice and IoU (%) on the test set with the Monte Carlo mean prediction.
Writes `tables/dice.md`, `tables/iou.md` (mean ± std (runs), the paper's BraTS number beside
each cell) and `tables/dice_iou.csv`.

`--table methods`: on one split (`--method-train-size`), the deterministic network, MC
dropout, a deep ensemble, N(0, 1) VI and — with `--prior-dir` — the deep weight prior, each
predicted on the test cases with T samples and evaluated (Dice, IoU, HD95, ECE, Brier, NLL,
QU-BraTS score). The deterministic and VI runs are predicted a second time with test-time
flips (rows `deterministic + TTA`, `vi + TTA`: every sample on each mirroring of the
spatial axes, the same trained run and temperatures). Writes `tables/methods.md`,
`tables/methods.csv` and `tables/methods.png`.

The `quick` preset (2D U-Net/V-Net/FCN, 8-64 channels, 64² patches, 150 steps) runs on a
CPU; `paper` is the paper code's 3D setup for a GPU. Finished runs are reused on a rerun.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from experiments.common import make_parser, run_cli
from experiments.configs import get_config, with_overrides
from experiments.studies import mean_std_table, run_grid, train_or_reuse, write_csv

BACKBONES = ("unet", "vnet", "fcn")
METHODS = ("deterministic", "mc_dropout", "ensemble", "vi", "dwp")
TTA_METHODS = ("deterministic", "vi")  # also predicted with test-time flips (+ TTA rows)
# The paper's BraTS numbers (method.md §8), %: {(metric, backbone): {train size: value}}.
PAPER = {
    ("dice", "unet"): {5: 53.1, 10: 56.6, 15: 60.8, 20: 64.3},
    ("dice", "vnet"): {5: 50.6, 10: 51.3, 15: 53.8, 20: 56.5},
    ("dice", "fcn"): {5: 50.2, 10: 52.1, 15: 54.4, 20: 58.9},
    ("iou", "unet"): {5: 48.4, 10: 50.6, 15: 53.1, 20: 55.8},
    ("iou", "vnet"): {5: 46.7, 10: 48.8, 15: 50.8, 20: 52.8},
    ("iou", "fcn"): {5: 47.2, 10: 50.4, 15: 52.6, 20: 54.3},
}
# Per preset: spatial dims, patch, batch, steps.
_PRESETS = {"quick": (2, (64, 64), 8, 150), "paper": (3, (128, 128, 128), 1, 20_000)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = make_parser("experiments.reproduce", __doc__)
    add = parser.add_argument
    add("--table", required=True, choices=("dice-iou", "methods"), help="which study")
    add("--out", required=True, type=Path, help="output folder (tables/ and runs/ inside)")
    add("--preset", default="quick", choices=tuple(_PRESETS), help="quick: 2D, CPU")
    add("--data-dir", type=Path, help="a BraTS-layout dataset (default: embedded synthetic)")
    add("--backbones", nargs="+", choices=BACKBONES, default=list(BACKBONES), help="dice-iou")
    add("--train-sizes", type=int, nargs="+", default=[5, 10, 15, 20], help="dice-iou")
    add("--repeats", type=int, default=3, help="seeded draws of the training cases")
    add("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods table")
    add("--method-train-size", type=int, default=20, help="training cases of the methods table")
    add("--prior-dir", type=Path, help="deep weight prior folder (the methods table's dwp)")
    add("--steps", type=int, help="training steps per run (preset default)")
    add("--features", type=int, nargs="+", help="channels per level (preset default)")
    add("--test-size", type=int, default=10, help="fixed test cases")
    add("--validation-size", type=int, default=5, help="fixed validation cases")
    add("--samples", type=int, default=10, help="Monte Carlo samples at test time")
    add("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if min(args.train_sizes) < 1 or args.repeats < 1 or args.samples < 1:
        parser.error("--train-sizes, --repeats and --samples must be >= 1")
    if args.table == "methods" and "dwp" in args.methods and args.prior_dir is None:
        parser.error("--methods dwp needs --prior-dir (python -m experiments.train_prior)")
    return args


def run_config(args: argparse.Namespace, backbone: str, method: str, size: int, repeat: int):
    """The configuration of one run of either study."""
    dims, patch, batch, steps = _PRESETS[args.preset]
    config = get_config(backbone, args.preset).with_method("vi" if method == "dwp" else method)
    backbone_overrides: dict = {"spatial_dims": dims}
    if args.features:
        backbone_overrides["features"] = tuple(args.features)
    if method == "dwp":
        config = config.with_deep_weight_prior(str(args.prior_dir.absolute()))
    data = {"patch_shape": patch, "batch_size": batch, "train_size": size}
    data.update(train_repeat=repeat, test_size=args.test_size)
    data["validation_size"] = args.validation_size
    if args.data_dir:
        data["data_dir"] = str(args.data_dir.absolute())
    return with_overrides(
        config,
        backbone=backbone_overrides,
        data=data,
        schedule={"steps": args.steps or steps, "patience_epochs": None},
        seed=repeat,
    )


def dice_iou_table(args: argparse.Namespace) -> None:
    from vi_seg_jax.plots import transfer_figure

    tables = args.out / "tables"
    tables.mkdir(parents=True, exist_ok=True)

    def write_tables(rows: list[dict]) -> None:
        write_csv(tables / "dice_iou.csv", rows)
        for metric in ("dice", "iou"):
            table = mean_std_table(
                rows,
                row_key="backbone",
                column_key="train_size",
                metric=metric,
                row_order=BACKBONES,
                reference=lambda b, n, m=metric: PAPER[(m, b)].get(n),
            )
            (tables / f"{metric}.md").write_text(table)
        transfer_figure(
            tables / "dice_vs_train_size.png", [{**r, "variant": r["backbone"]} for r in rows]
        )

    run_grid(
        args.backbones,
        args.train_sizes,
        args.repeats,
        name_key="backbone",
        config_for=lambda backbone, size, repeat: run_config(args, backbone, "vi", size, repeat),
        runs_dir=args.out / "runs",
        samples=args.samples,
        after_each=write_tables,
        progress=not args.no_progress,
    )
    print((tables / "dice.md").read_text())


def methods_table(args: argparse.Namespace) -> None:
    from vi_seg_jax.evaluation import PREDICTION_FILE, PredictionRun, evaluate_folder
    from vi_seg_jax.parallel import data_mesh
    from vi_seg_jax.plots import methods_figure
    from vi_seg_jax.predict import Predictor, load_trained, predict_folder

    tables = args.out / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    # (row, method, tta): each method, and the TTA methods again with flips after their row.
    entries = []
    for method in args.methods:
        entries.append((method, method, "none"))
        if method in TTA_METHODS:
            entries.append((f"{method} + TTA", method, "flips"))
    rows = []
    for row, method, tta in entries:
        workdir = args.out / "runs" / f"method-{method}-n{args.method_train_size}"
        train_or_reuse(run_config(args, "unet", method, args.method_train_size, 0), workdir)
        folder = method if tta == "none" else f"{method}-tta"
        predictions = args.out / "predictions" / folder
        if not (predictions / PREDICTION_FILE).exists():
            fixed = method in ("deterministic", "ensemble")  # 1 sample / one per member
            predictor = Predictor(
                load_trained(workdir),
                num_samples=None if fixed else args.samples,
                mesh=data_mesh(),  # every device, as `experiments.predict`
                tta=tta,
            )
            predict_folder(predictor, predictions, split="test", progress=False)
        run = PredictionRun.read(predictions)
        summary = evaluate_folder(run, args.out / "evaluation" / folder, progress=False)["wt"]
        # Metrics in alphabetical order, the columns methods.csv has always had.
        rows.append({"method": row} | {m: summary[m]["mean"] for m in sorted(summary)})
        write_csv(tables / "methods.csv", rows)
    shown = ("dice", "iou", "hd95", "ece", "brier", "nll", "qubrats_score")
    lines = ["| method | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
    for row in rows:
        cells = [f"{100 * row[m]:.1f}" if m in ("dice", "iou") else f"{row[m]:.3g}" for m in shown]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    (tables / "methods.md").write_text("\n".join(lines) + "\n")
    methods_figure(tables / "methods.png", rows)
    print((tables / "methods.md").read_text())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table == "dice-iou":
        dice_iou_table(args)
    else:
        methods_table(args)
    print(f"tables in {args.out / 'tables'}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
