"""U-Net upsampling: `"resize"` vs `"transpose"`, forward+backward, in one run.

Usage (from the repository root):
  python -m benchmarks.upsampling [--size 32] [--repeats 7]

Prints one JSON line. Every measurement is a jitted `value_and_grad` w.r.t. the parameters
(a training step's work, without the optimiser); after one warm-up (compilation) call the
variants are timed in alternation, `--repeats` rounds, reporting median ms and the median of
the per-round time ratios (robust to a noisy, shared machine):

- `op`: one `UpBlock` upsampling alone, `[2, (S/2)³, 32] → [2, S³, 16]`:
  `resize` (1×1×1 conv + `jax.image.resize` linear), `transpose` (the project's kernel-2
  stride-2 transposed conv as 1×1×1 conv + depth-to-space) and, for reference,
  `flax.linen.ConvTranspose` (`lax.conv_transpose`, whose 3D gradient is slow: jax issue
  #31662).
- `unet`: the whole 3D `UNet(features=(8, 16, 32, 64))` on `[1, S³, 1]` in both modes.

`ratio_resize_over_transpose` (the upsampling op alone) > 1 means `"transpose"` is faster;
`unet_ratio_resize_over_transpose` shows how much of it survives in a whole network step.
Takes about 20-25 s on a 2-core CPU at the default size (limit: two minutes).

Measured (2-core Zen 3, jax 0.10.2, S = 32, five runs): op ratio 1.18-1.60 (transpose
faster), flax `ConvTranspose` 39-64× slower than `transpose`; whole-U-Net ratio 0.985-1.02,
within noise: the upsampling is ~1% of the step. `UNet.upsample` defaults to `"transpose"`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vi_seg_jax.backbones import UNet, upsample2x


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
        return upsample2x(
            x, features=self.features, mode=self.mode, spatial_dims=3, name="upsample"
        )


def _compile_grad(module: nn.Module, x: jax.Array):
    """A jitted `params -> (loss, grads)` step, its params, and its first-call time (s)."""
    # Parameter values do not matter for timing; filling the abstract tree from numpy avoids
    # compiling the initialisers (threefry for ~40 arrays takes 10-20 s to compile on CPU).
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda a: jnp.asarray(
            rng.normal(0.0, (np.prod(a.shape[:-1]) or 1) ** -0.5, a.shape), a.dtype
        ),
        shapes,
    )

    def loss(params):
        out = module.apply({"params": params}, x)
        out = out[0] if isinstance(out, tuple) else out
        return jnp.mean(jnp.square(out))

    step = jax.jit(jax.value_and_grad(loss))
    t0 = time.perf_counter()
    jax.block_until_ready(step(params))
    return step, params, time.perf_counter() - t0


def _interleaved(steps: dict[str, tuple], repeats: int) -> dict[str, Any]:
    """Times the compiled steps in alternation (robust to a noisy, shared machine).

    Returns per-mode median ms and, for each pair against `"transpose"`, the median over
    rounds of the per-round time ratio.
    """
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for k, (step, params, _) in steps.items():
            t0 = time.perf_counter()
            jax.block_until_ready(step(params))
            times[k].append(time.perf_counter() - t0)
    return {
        "ms": {k: round(1e3 * statistics.median(v), 3) for k, v in times.items()},
        "first_call_s": {k: round(v[2], 2) for k, v in steps.items()},
        "ratio_over_transpose": {
            k: round(
                statistics.median(a / b for a, b in zip(v, times["transpose"], strict=True)), 3
            )
            for k, v in times.items()
            if k != "transpose"
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="full-resolution edge S")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.size % 8:
        parser.error("--size must be a multiple of 8")
    start = time.perf_counter()
    s = args.size

    x_op = jax.random.normal(jax.random.key(1), (2, s // 2, s // 2, s // 2, 32))
    op = _interleaved(
        {
            mode: _compile_grad(_Up(16, mode), x_op)
            for mode in ("resize", "transpose", "conv_transpose")
        },
        args.repeats,
    )
    x_net = jax.random.normal(jax.random.key(2), (1, s, s, s, 1))
    net = _interleaved(
        {
            mode: _compile_grad(
                UNet(2, spatial_dims=3, features=(8, 16, 32, 64), upsample=mode), x_net
            )
            for mode in ("resize", "transpose")
        },
        args.repeats,
    )
    ratio = op["ratio_over_transpose"]["resize"]
    net_ratio = net["ratio_over_transpose"]["resize"]
    record = {
        "benchmark": "upsampling",
        "what": "jitted value_and_grad wrt params; median ms; ratios: median of per-round ratios",
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "cpu": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "size": s,
        "repeats": args.repeats,
        "op_input_shape": list(x_op.shape),
        "op": op,
        "unet_input_shape": list(x_net.shape),
        "unet": net,
        "ratio_resize_over_transpose": ratio,
        "unet_ratio_resize_over_transpose": net_ratio,
        "faster": "transpose" if ratio > 1 else "resize",
        "unet_difference_within_5pct": abs(net_ratio - 1.0) < 0.05,
        "total_s": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
