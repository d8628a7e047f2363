"""`benchmarks.train_step` end to end on a tiny step: one record per formulation, with the
attainable peak, each formulation's own peak RSS and the tuning report."""

import json
import math

import jax

from benchmarks import train_step

TINY = [
    "--backbone",
    "unet",
    "--features",
    "4",
    "8",
    "--patch",
    "8",
    "--batch",
    "1",
    "--steps",
    "1",
]


def test_one_record_per_formulation(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("VI_SEG_JAX_CACHE", str(tmp_path))
    # Run as a user runs it: standard dtype promotion (the suite's is strict).
    with jax.numpy_dtype_promotion("standard"):
        train_step.main([*TINY, "--conv-impl", "auto,onednn"])
    records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["conv_impl"] for r in records] == ["auto", "onednn"]
    for record in records:
        for key in ("seconds_per_step", "peak_rss_mb", "attainable_peak_flops"):
            assert math.isfinite(record[key]) and record[key] > 0, key
        # (the printed seconds are rounded to 0.1 ms)
        assert math.isclose(
            record["conv_fraction_of_attainable_peak"],
            record["conv_flops_per_step"]
            / record["seconds_per_step"]
            / record["attainable_peak_flops"],
            rel_tol=0.02,
            abs_tol=2e-4,
        )
        assert record["peak_rss_basis"] == "this formulation's steps"
        assert set(record["tuning_pieces"]) == {"measured", "read_from_file", "by_rule"}
        assert record["tuning_file"].startswith(str(tmp_path))
        assert record["loss_finite"]
    # The suite tunes nothing (conftest): the tiny step's convs take the rule.
    assert records[0]["tuning_seconds"] == 0 and records[0]["tuning_pieces"]["by_rule"] > 0
    assert "speedup_over_auto" in records[1]
    # oneDNN's convolutions are counted, though XLA's cost analysis sees 0 in custom calls.
    assert records[1]["flops_per_step"] >= records[1]["conv_flops_per_step"]


def test_augmentation_cost_is_reported_beside_the_step(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("VI_SEG_JAX_CACHE", str(tmp_path))
    with jax.numpy_dtype_promotion("standard"):
        train_step.main([*TINY, "--conv-impl", "gemm", "--augment", "default"])
        train_step.main([*TINY, "--conv-impl", "gemm"])
    augmented, plain = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert augmented["augment"] == "default" and augmented["loss_finite"]
    assert 0 < augmented["augment_seconds"] < 10 * augmented["seconds_per_step"]
    assert plain["augment"] == "none" and plain["augment_seconds"] is None
