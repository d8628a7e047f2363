"""Training and Monte Carlo prediction throughput against the number of devices.

Usage (from the repository root):
  python -m benchmarks.scaling [--devices 1,2,4,8] [--patch 32] [--batch 8] [--volume 64]
      [--samples 8] [--rounds 3] [--precision fp32|bf16]

Prints one JSON line: for each device count, the training step's seconds, patches per
second and memory per device (XLA's memory analysis of the compiled step), and the
posterior predictive's samples per second on one volume (T = `--samples`, spread over the
devices) with its memory per device; plus `*_relative_to_1`, the throughput ratio against
one device. Steps of the different device counts are timed interleaved (round-robin), so
a noisy machine slows them alike, and ratios come from one run.

On a CPU the devices are simulated (`--xla_force_host_platform_device_count`, set before
JAX starts) and share the same cores: the ratios measure the overhead of sharding (they
should stay near 1), not a speed-up. On GPUs or TPUs the device counts must not exceed
the devices present.

The model is the paper's 3D U-Net (VI, local reparameterisation), the global batch is
`--batch` patches of `--patch`³ voxels split over the devices.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from benchmarks.train_step import memory_per_device_mb


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--devices", default="1,2,4,8", type=lambda v: [int(n) for n in v.split(",")]
    )
    parser.add_argument("--patch", type=int, default=32, help="training patch edge (voxels)")
    parser.add_argument("--batch", type=int, default=8, help="global batch")
    parser.add_argument("--volume", type=int, default=64, help="prediction volume edge")
    parser.add_argument("--samples", type=int, default=8, help="Monte Carlo samples T")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after a warm-up")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    args = parser.parse_args(argv)
    if min(args.devices) < 1 or any(args.batch % n for n in args.devices):
        parser.error("--batch must divide evenly over every --devices count")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    return args


def _setups(args: argparse.Namespace) -> dict[int, dict]:
    """Compiled training step and predictive per device count."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from vi_seg_jax.backbones import get_backbone
    from vi_seg_jax.parallel import batch_sharded, data_mesh, replicated
    from vi_seg_jax.train.state import ModelSpec, create_train_state
    from vi_seg_jax.train.step import make_train_step
    from vi_seg_jax.uncertainty import posterior_predictive, sample_fn_for

    spec = ModelSpec(get_backbone("unet", num_classes=2, spatial_dims=3), precision=args.precision)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(args.batch, *(args.patch,) * 3, 4)).astype(np.float32)
    labels = rng.integers(0, 2, size=(args.batch, *(args.patch,) * 3)).astype(np.uint8)
    volume = jnp.asarray(rng.normal(size=(1, *(args.volume,) * 3, 4)), jnp.float32)
    setups = {}
    for devices in args.devices:
        mesh = data_mesh(devices, batch_size=args.batch)
        state = create_train_state(jax.random.key(0), spec, images, replicated(mesh))
        batch = tuple(jax.device_put(a, batch_sharded(mesh)) for a in (images, labels))
        step = make_train_step(spec, mesh).lower(state, batch).compile()

        def predict(state, key, mesh=mesh):
            return posterior_predictive(
                sample_fn_for(spec, state), volume, key, num_samples=args.samples, mesh=mesh
            ).mean

        predictor = jax.jit(predict).lower(state, jax.random.key(1)).compile()
        state, _ = step(state, batch)  # warm-up
        jax.block_until_ready(predictor(state, jax.random.key(1)))
        setups[devices] = {
            "step": step,
            "predictor": predictor,
            "state": state,
            "batch": batch,
            "train_memory_per_device_mb": memory_per_device_mb(step),
            "predict_memory_per_device_mb": memory_per_device_mb(predictor),
            "train_times": [],
            "predict_times": [],
        }
    return setups


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if "jax" in sys.modules:
        raise RuntimeError("run as `python -m benchmarks.scaling` (devices are set at start)")
    if os.environ.get("JAX_PLATFORMS") == "cpu" or not _has_accelerator():
        flag = f"--xla_force_host_platform_device_count={max(args.devices)}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    import jax

    if max(args.devices) > jax.device_count():
        raise SystemExit(f"--devices {max(args.devices)}: only {jax.device_count()} available")

    setups = _setups(args)
    for _ in range(args.rounds):
        for setup in setups.values():
            t0 = time.perf_counter()
            setup["state"], metrics = setup["step"](setup["state"], setup["batch"])
            jax.block_until_ready(metrics)
            setup["train_times"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            jax.block_until_ready(setup["predictor"](setup["state"], jax.random.key(2)))
            setup["predict_times"].append(time.perf_counter() - t0)

    base = setups[min(setups)]
    results = []
    for devices, setup in setups.items():
        train = statistics.median(setup["train_times"])
        predict = statistics.median(setup["predict_times"])
        train_ratios = [
            a / b for a, b in zip(base["train_times"], setup["train_times"], strict=True)
        ]
        predict_ratios = [
            a / b for a, b in zip(base["predict_times"], setup["predict_times"], strict=True)
        ]
        results.append(
            {
                "devices": devices,
                "train_seconds_per_step": round(train, 4),
                "train_patches_per_second": round(args.batch / train, 3),
                "train_throughput_relative_to_1": round(statistics.median(train_ratios), 3),
                "train_memory_per_device_mb": setup["train_memory_per_device_mb"],
                "predict_seconds": round(predict, 4),
                "predict_samples_per_second": round(args.samples / predict, 3),
                "predict_throughput_relative_to_1": round(statistics.median(predict_ratios), 3),
                "predict_memory_per_device_mb": setup["predict_memory_per_device_mb"],
            }
        )
    device = jax.devices()[0]
    print(
        json.dumps(
            {
                "benchmark": "scaling",
                "platform": jax.default_backend(),
                "device": device.device_kind,
                "simulated_devices": jax.default_backend() == "cpu",
                "cpu_cores": os.cpu_count(),
                "patch": args.patch,
                "batch": args.batch,
                "volume": args.volume,
                "samples": args.samples,
                "precision": args.precision,
                "rounds": args.rounds,
                "results": results,
                "jax": jax.__version__,
            }
        ),
        flush=True,
    )


def _has_accelerator() -> bool:
    """Whether an accelerator backend is installed, without starting JAX's backends."""
    import importlib.util

    return any(
        importlib.util.find_spec(name) is not None
        for name in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu")
    )


if __name__ == "__main__":
    main()
