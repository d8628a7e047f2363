"""Data parallelism: N simulated CPU devices train and predict what one device does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from vi_seg_jax.parallel import DistributedConfig, data_mesh, initialize_distributed, process_rows

# Float32 sums in another order: the same model to a few ulps of the weights.
TOLERANCE = 2e-6


@pytest.fixture(scope="module")
def report():
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
        "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    script = Path(__file__).with_name("parallel_checks.py")
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).parents[1],
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "run_name, devices",
    [("train", 2), ("train", 8), ("train_3d", 2), ("train_3d", 4), ("train_3d_ensemble", 2)],
)
def test_sharded_training_reaches_the_single_device_parameters(report, run_name, devices):
    run = report[f"{run_name}_{devices}"]
    assert report["device_count"] == 8
    # Really data-parallel: the batch is split, the state replicated, gradients all-reduced,
    # and no device computes (or gathers) the whole batch's activations.
    assert run["batch_devices"] == devices and run["state_devices"] == devices
    assert run["all_reduce"]
    assert not run["all_gather"]
    assert run["whole_batch_shapes"] == []
    assert run["max_difference"] < TOLERANCE
    assert report["train_param_change"] > 1000 * TOLERANCE  # the steps did move the weights


@pytest.mark.parametrize("case", ["T10_chunk2", "T3_chunk1"])
def test_sharded_prediction_equals_single_device(report, case):
    run = report[f"predict_{case}"]
    assert run["epistemic_max"] > 1e-3  # samples differ, so a wrong sample set would show
    assert run["scan_vs_single"] < 1e-6
    assert run["stepped_vs_single"] < 1e-6
    assert run["single_stepped_vs_scan"] < 1e-6


def test_sharded_volume_predictor_equals_single_device(report):
    run = report["predictor_4"]
    assert run["epistemic_max"] > 1e-5
    assert run["difference"] < 1e-6


def test_data_mesh_checks_devices_and_batch():
    assert data_mesh().size == jax.device_count()
    assert data_mesh(batch_size=3).size == 1
    with pytest.raises(ValueError, match="--devices 2: 1 device"):
        data_mesh(2)
    mesh = data_mesh(1, batch_size=4)
    assert process_rows(mesh, 4) == slice(0, 4)


def test_distributed_flags_are_checked_before_joining():
    initialize_distributed(DistributedConfig())  # not asked for: nothing happens
    with pytest.raises(ValueError, match="need --coordinator-address or --distributed"):
        initialize_distributed(DistributedConfig(num_processes=2, process_id=0))
    with pytest.raises(ValueError, match="--num-processes and --process-id"):
        initialize_distributed(DistributedConfig(coordinator_address="localhost:1234"))
    with pytest.raises(ValueError, match=r"--process-id must be in \[0, 2\)"):
        initialize_distributed(
            DistributedConfig(coordinator_address="localhost:1234", num_processes=2, process_id=2)
        )
