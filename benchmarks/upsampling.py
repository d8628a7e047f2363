"""U-Net upsampling: `"resize"` vs `"transpose"`, forward+backward, in one run.

Usage:
  python -m benchmarks.upsampling [--size 32] [--repeats 5]   (from the repository root)

Prints one JSON line. Two measurements, both jitted `value_and_grad` w.r.t. the parameters
(a training step's work, without the optimiser), median of `--repeats` timed calls after one
warm-up (compilation) call:

- `op`: one `UpBlock` upsampling alone, `[2, (S/2)³, 32] → [2, S³, 16]`:
  `resize` (1×1×1 conv + `jax.image.resize` linear), `transpose` (the project's kernel-2
  stride-2 transposed conv as 1×1×1 conv + depth-to-space) and, for reference,
  `flax.linen.ConvTranspose` (`lax.conv_transpose`, whose 3D gradient is slow: jax issue
  #31662).
- `unet`: the whole 3D `UNet(features=(8, 16, 32, 64))` on `[1, S³, 1]` in both modes.

`ratio_resize_over_transpose` > 1 means `"transpose"` is faster. Finishes in well under two
minutes on a 2-core CPU at the default size.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from vi_seg_jax.backbones import UNet
from vi_seg_jax.backbones._blocks import upsample2x


class _Up(nn.Module):
    """The upsampling step of `UpBlock` alone (or flax's ConvTranspose, mode "conv_transpose")."""

    features: int
    mode: str

    @nn.compact
    def __call__(self, x):
        if self.mode == "conv_transpose":
            return nn.ConvTranspose(
                self.features, (2, 2, 2), strides=(2, 2, 2), use_bias=False, name="upsample"
            )(x)
        return upsample2x(x, features=self.features, mode=self.mode, spatial_dims=3, name="upsample")


def _time_grad(module: nn.Module, x: jax.Array, repeats: int) -> dict[str, float]:
    """Median wall time (ms) of a jitted value_and_grad w.r.t. params, and the compile time."""
    variables = module.init(jax.random.key(0), x)

    def loss(params):
        out = module.apply({"params": params}, x)
        out = out[0] if isinstance(out, tuple) else out
        return jnp.mean(jnp.square(out))

    step = jax.jit(jax.value_and_grad(loss))
    t0 = time.perf_counter()
    jax.block_until_ready(step(variables["params"]))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(step(variables["params"]))
        times.append(time.perf_counter() - t0)
    return {"ms": 1e3 * statistics.median(times), "first_call_s": compile_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="full-resolution edge S")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.size % 8:
        parser.error("--size must be a multiple of 8")
    start = time.perf_counter()
    s = args.size

    x_op = jax.random.normal(jax.random.key(1), (2, s // 2, s // 2, s // 2, 32))
    op = {
        mode: _time_grad(_Up(16, mode), x_op, args.repeats)
        for mode in ("resize", "transpose", "conv_transpose")
    }
    x_net = jax.random.normal(jax.random.key(2), (1, s, s, s, 1))
    net = {
        mode: _time_grad(
            UNet(2, spatial_dims=3, features=(8, 16, 32, 64), upsample=mode), x_net, args.repeats
        )
        for mode in ("resize", "transpose")
    }
    ratio = net["resize"]["ms"] / net["transpose"]["ms"]
    record = {
        "benchmark": "upsampling",
        "what": "jitted value_and_grad wrt params, median ms",
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "cpu": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "size": s,
        "repeats": args.repeats,
        "op_input_shape": list(x_op.shape),
        "op_ms": {k: round(v["ms"], 3) for k, v in op.items()},
        "op_ratio_resize_over_transpose": round(op["resize"]["ms"] / op["transpose"]["ms"], 3),
        "op_ratio_conv_transpose_over_transpose": round(
            op["conv_transpose"]["ms"] / op["transpose"]["ms"], 3
        ),
        "unet_input_shape": list(x_net.shape),
        "unet_ms": {k: round(v["ms"], 3) for k, v in net.items()},
        "unet_first_call_s": {k: round(v["first_call_s"], 2) for k, v in net.items()},
        "ratio_resize_over_transpose": round(ratio, 3),
        "faster": "transpose" if ratio > 1 else "resize",
        "total_s": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
