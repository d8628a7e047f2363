"""`benchmarks.predict` end to end on a tiny model and volume (seconds, not minutes)."""

import json
import math

import pytest
from jax import config

from benchmarks import predict

TINY = ["--features", "4", "8", "--window", "16", "--repeats", "1"]
SETTINGS = ("samples", "backbone", "features", "window", "chunk", "channels", "method", "jax")


def _run(capsys, *argv) -> dict:
    predict.main([*TINY, *argv])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def _positive(record: dict, *keys: str) -> None:
    for key in keys:
        value = record[key]
        assert math.isfinite(value) and value > 0, (key, value)


def test_volume_against_the_python_loop(capsys):
    record = _run(capsys, "--size", "16", "--samples", "2", "--loop-samples", "1")
    assert set(SETTINGS) <= record.keys()
    _positive(
        record,
        "seconds",
        "voxel_samples_per_second",
        "peak_rss_mb",
        "peak_rss_mb_predictor",
        "speedup_vs_python_loop",
        "loop_seconds",
    )
    assert record["compile_seconds"] >= 0 and record["mean_finite"]
    # One loop sample, scaled to the two of the predictor; the means agreed on it.
    assert record["loop_samples"] == 1 and record["loop_scaled"]
    assert record["mean_max_abs_diff"] < 1e-4
    assert record["peak_rss_mb"] >= record["peak_rss_mb_predictor"]


def test_case_and_memory_sweep(capsys, monkeypatch):
    # The sweep's children: CPU, few optimisations, the suite's compile cache.
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", config.jax_compilation_cache_dir)
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    record = _run(capsys, "--samples", "2", "--shape", "32", "32", "24", "--memory-sweep", "2")
    assert record["mode"] == "case" and record["probabilities_finite"]
    assert record["shape"] == [32, 32, 24]
    _positive(record, "seconds", "voxel_samples_per_second", "peak_rss_mb")
    assert list(record["peak_rss_mb_by_samples"]) == ["2"]
    _positive(record["peak_rss_mb_by_samples"], "2")
    _positive(record["seconds_by_samples"], "2")


def test_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        predict.main(["--samples", "2", "--loop-samples", "3"])
