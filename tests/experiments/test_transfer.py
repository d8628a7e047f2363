"""The transfer study end to end on tiny shapes: source → prior → every variant → tables."""

import csv
import json

import jax

from experiments import transfer
from vi_seg_jax.data.synthetic import write_dataset


def test_every_variant_runs_and_lands_in_the_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("VI_SEG_JAX_CACHE", str(tmp_path / "cache"))
    source, target = tmp_path / "lesions", tmp_path / "tumours"
    write_dataset(source, num_cases=2, domain="lesions", shape=(64, 64, 8), seed=6)
    write_dataset(target, num_cases=3, shape=(64, 64, 8), seed=1)
    out = tmp_path / "transfer"
    argv = ["--out", str(out), "--data-dir", str(target), "--source-data-dir", str(source)]
    argv += ["--features", "4", "8", "8", "16", "--train-sizes", "1", "--steps", "2"]
    argv += ["--test-size", "1", "--validation-size", "1", "--samples", "1"]
    argv += ["--source-steps", "2", "--vae-steps", "10", "--no-progress"]
    with jax.numpy_dtype_promotion("standard"):
        assert transfer.main(argv) == 0

    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["variant"] for r in rows] == list(transfer.VARIANTS)
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    table = (out / "dice.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == list(transfer.VARIANTS)
    assert (out / "dice_vs_train_size.png").stat().st_size > 0

    def config(variant):
        return json.loads((out / "runs" / f"{variant}-n1-r0" / "config.json").read_text())

    assert config("DWP")["prior"] == "dwp" and not config("DWP")["dwp_train_encoder"]
    assert config("DWP-E")["dwp_train_encoder"]
    assert config("PRf")["frozen_layers"] and config("PR")["init_from"]
    assert config("VI")["prior"] == "normal" and config("RI")["method"]["method"] == "deterministic"
