#!/usr/bin/env bash
# The GPU check: the GPU-relevant tests and benchmarks on one GPU, in about 10 minutes.
#
#   bash benchmarks/gpu_check.sh
#
# Prints a JSON line naming the device, pytest's summary of the tests that exercise the
# accelerator (convolution formulations, Monte Carlo reductions, fp32 and bf16 training
# that must converge, the deep weight prior with its encoders trained, checkpoints), then
# one JSON line per benchmark: the training step (paper 3D U-Net, LRT) at 2x4x64^3 and
# 2x4x128^3 in fp32 and bf16 with its fraction of the GPU's peak and memory, and the
# posterior predictive's throughput and memory on a 128^3 volume.
# `PYTHON` picks the interpreter (default: python3). Exits non-zero if a test failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
# The test suite defaults to the CPU; here the tests run on the GPU.
export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"

"$PYTHON" -c '
import json, jax
device = jax.devices()[0]
print(json.dumps({"check": "devices", "platform": device.platform, "device": device.device_kind,
                  "count": jax.device_count(), "jax": jax.__version__}))'

status=0
"$PYTHON" -m pytest -q -p no:cacheprovider -n 0 \
    tests/ops/test_conv3d.py tests/ops/test_conv_tuning.py \
    tests/test_uncertainty.py \
    "tests/train/test_step.py::test_variational_training_drives_loss_down_and_dice_up[unet]" \
    "tests/train/test_step.py::test_bf16_training_computes_in_bfloat16_and_still_learns" \
    tests/test_checkpoint.py tests/dwp/test_prior.py tests/experiments/test_train_prior.py \
    || status=1

for patch in 64 128; do
    for precision in fp32 bf16; do
        # "auto" tunes XLA's convs against the rewrites on the GPU; "lax" is XLA's alone.
        "$PYTHON" -m benchmarks.train_step --patch "$patch" --precision "$precision" --steps 5 \
            --conv-impl auto,lax || status=1
    done
done
"$PYTHON" -m benchmarks.predict --size 128 --samples 16 --chunk 4 --window 128 \
    --loop-samples 0 --repeats 2 || status=1
exit "$status"
