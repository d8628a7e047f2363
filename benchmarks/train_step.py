"""Throughput of one jitted training step (`make_train_step`) per backbone.

Usage (from the repository root):
  python -m benchmarks.train_step [--backbone unet|vnet|fcn|all] [--patch 64] [--batch 2]
      [--channels 4] [--features 16 32 64 128] [--particles 1] [--estimator lrt|full] [--method vi|deterministic|mc_dropout|ensemble]
      [--steps 5] [--devices 1] [--spatial-dims 3] [--precision fp32|bf16] [--clock-ghz GHZ]
      [--conv-impl auto[,lax,xla,summed,stacked,gemm,onednn]]

Prints one JSON line per backbone and `--conv-impl` value: `seconds_per_step` (median of
`--steps` timed steps after one warm-up call), `voxels_per_second`, `peak_rss_mb` (the
peak resident memory of that formulation's first two steps alone: Linux `clear_refs` resets
the peak before them; `peak_rss_basis` says when it could not), `flops_per_step` (XLA's
`compiled.cost_analysis()` of the whole step, summed over devices; it counts the rewrites'
extra work; the nominal FLOPs of oneDNN's convolutions are added, since XLA cannot see into
its custom calls), `conv_flops_per_step` (the convolutions' nominal FLOPs counted from the step's
jaxpr with plain `lax` convs: forward, input and weight gradients, the framework-neutral
measure), `fraction_of_peak` / `conv_fraction_of_peak` against the nominal peak (cores ×
clock × vector width), `fraction_of_attainable_peak` / `conv_fraction_of_attainable_peak`
against the attainable one (`attainable_peak_flops`: a 4096³ fp32 matrix product through
XLA, timed in the same run), `compile_seconds` (tuning excluded), `tuning_seconds` and
`tuning_pieces` (conv pieces measured now, read from the tuning file, or left to the rule;
see `vi_seg_jax.ops.conv_tuning`), and the settings.

Nominal peak FLOP/s: on CPU, cores × clock × FLOP/cycle/core. The clock is `cpu MHz` from
/proc/cpuinfo (`--clock-ghz` overrides it; boost clocks under load can be higher). FLOP/cycle
for fp32: AVX-512 with two 512-bit FMA units → 64; AVX2+FMA (two 256-bit FMA units) → 32;
AMD Zen 4 (family 0x19) executes AVX-512 on its two 256-bit FMA units → 32. On a GPU, a
table of peaks keyed on the device name: fp32 without tensor cores (H100 SXM / H200 ~67
TFLOP/s; XLA may run fp32 convolutions as TF32 on tensor cores, so fractions above 1 are
possible) and dense bf16 tensor cores for `--precision bf16` (H100 SXM / H200 ~989 TFLOP/s),
else null. `memory_per_device_mb` is XLA's memory analysis of the compiled step (arguments,
outputs and temporaries on one device); `peak_device_memory_mb` the allocator's peak where
the device reports it (GPU).

`--devices N` (CPU) forces N host devices (`--xla_force_host_platform_device_count`, set
before jax is imported) and trains on the mesh of `vi_seg_jax.parallel` (the batch sharded,
the state replicated; the batch must divide by N). `--conv-impl a,b,...` compiles the step
with the backbone's convolutions computed by each `vi_seg_jax.ops.ConvEngine` impl ("auto":
the formulations measured fastest on this machine, tuning first where needed; "lax": XLA's
own convs; "xla", "summed", "stacked", "gemm", "onednn": one formulation everywhere) and times them
interleaved, adding `speedup_over_<a>` (the median of per-round time ratios: robust on a
shared, noisy machine). A second run reads the tuning file (`tuning_seconds` ≈ 0); deleting
`tuning_file` retunes. Measured numbers, with the CPU they were measured on, are in the
README's Performance section.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any

BACKBONE_NAMES = ("unet", "vnet", "fcn")

# fp32 peak FLOP/s without tensor cores, keyed on a substring of `device_kind` (first match).
GPU_FP32_PEAKS: tuple[tuple[str, float], ...] = (
    ("H200", 67e12),
    ("H100 PCIe", 51e12),
    ("H100", 67e12),
    ("A100", 19.5e12),
    ("L40S", 91.6e12),
    ("L4", 30.3e12),
    ("A10G", 31.2e12),
    ("V100", 15.7e12),
    ("T4", 8.1e12),
)
# Dense bfloat16 tensor-core peaks (no sparsity).
GPU_BF16_PEAKS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="unet", choices=(*BACKBONE_NAMES, "all"))
    parser.add_argument("--patch", type=int, default=64, help="patch edge (voxels)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=4, help="input channels")
    parser.add_argument(
        "--features", type=int, nargs="+", default=None, help="channels per level (default: paper)"
    )
    parser.add_argument("--particles", type=int, default=1)
    parser.add_argument("--estimator", default="lrt", choices=("lrt", "full"))
    parser.add_argument(
        "--method", default="vi", choices=("vi", "deterministic", "mc_dropout", "ensemble")
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps after a warm-up")
    parser.add_argument("--devices", type=int, default=1, help="shard the batch over N devices")
    parser.add_argument("--spatial-dims", type=int, default=3, choices=(2, 3))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument(
        "--augment",
        default="none",
        choices=("none", "light", "default"),
        help="augmentation preset run inside the step; its own time is reported beside",
    )
    parser.add_argument(
        "--conv-impl",
        default="auto",
        type=lambda v: v.split(","),
        help="comma-separated vi_seg_jax.ops.CONV_IMPLS, timed interleaved (first = baseline)",
    )
    parser.add_argument("--clock-ghz", type=float, default=None, help="CPU clock for the peak")
    args = parser.parse_args(argv)
    if args.devices < 1 or args.batch % args.devices:
        parser.error("--batch must be a positive multiple of --devices")
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    return args


# --------------------------------------------------------------------------- peak FLOP/s


def cpu_peak_flops(clock_ghz: float | None = None) -> dict[str, Any]:
    """Estimated fp32 peak of this CPU: cores × clock × FLOP/cycle/core, and how."""
    from vi_seg_jax.ops.conv_tuning import cpu_info

    info = cpu_info()
    flags = set(info.get("flags", "").split())
    cores = os.cpu_count() or 1
    vendor = info.get("vendor_id", "")
    family = int(info.get("cpu family", "0") or 0)
    if "avx512f" in flags and not (vendor == "AuthenticAMD" and family == 0x19):
        per_cycle, isa = 64, "AVX-512, 2 FMA units x 16 fp32 lanes"
    elif "avx512f" in flags:
        per_cycle, isa = 32, "AVX-512 on AMD Zen 4 (two 256-bit FMA units, double-pumped)"
    elif "avx2" in flags and "fma" in flags:
        per_cycle, isa = 32, "AVX2+FMA, 2 FMA units x 8 fp32 lanes"
    elif "avx" in flags:
        per_cycle, isa = 16, "AVX, no FMA"
    else:
        per_cycle, isa = 8, "SSE"
    if clock_ghz is not None:
        clock, clock_source = clock_ghz, "--clock-ghz"
    elif info.get("cpu MHz"):
        clock, clock_source = float(info["cpu MHz"]) / 1e3, "/proc/cpuinfo cpu MHz"
    else:
        clock, clock_source = 2.0, "assumed (no /proc/cpuinfo)"
    return {
        "peak_flops": cores * clock * 1e9 * per_cycle,
        "peak_basis": f"{cores} cores x {clock:.3f} GHz ({clock_source}) x {per_cycle} "
        f"FLOP/cycle ({isa})",
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
    }


def gpu_peak_flops(device_kind: str, precision: str = "fp32") -> dict[str, Any]:
    table, basis = (
        (GPU_FP32_PEAKS, "fp32 non-tensor")
        if precision == "fp32"
        else (GPU_BF16_PEAKS, "bf16 dense tensor")
    )
    for key, peak in table:
        if key.lower() in device_kind.lower():
            return {"peak_flops": peak, "peak_basis": f"table: {key} {basis}"}
    return {"peak_flops": None, "peak_basis": f"unknown device {device_kind!r}"}


def memory_per_device_mb(compiled) -> float | None:
    """Arguments + outputs + temporaries of a compiled function on one device (XLA's analysis)."""
    try:
        memory = compiled.memory_analysis()
    except Exception:
        return None
    if memory is None:
        return None
    total = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    return round(total / 2**20, 1)


def _peak_device_memory_mb() -> float | None:
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else round(peak / 2**20, 1)


# --------------------------------------------------------------------------- FLOP counts


def _xla_flops(compiled, num_devices: int) -> float | None:
    """FLOPs of the whole step from XLA's cost analysis (per device × devices), or None."""
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost or cost["flops"] <= 0:
        return None
    return float(cost["flops"]) * num_devices


def conv_flops(jaxpr) -> float:
    """Nominal FLOPs (2 per multiply-add) of every convolution in a closed jaxpr, recursively.

    Counts `2 × out elements × (kernel window × C_in / groups)`, for the forward convs and
    the transposed ones autodiff made (input and weight gradients).
    """
    import numpy as np

    def flops(eqn) -> float:
        if eqn.primitive.name != "conv_general_dilated":
            return 0.0
        rhs, out = eqn.invars[1].aval, eqn.outvars[0].aval
        dn = eqn.params["dimension_numbers"]
        k_spatial = np.prod([rhs.shape[i] for i in dn.rhs_spec[2:]])
        k_in = rhs.shape[dn.rhs_spec[1]]
        # out elements × window × input features per group (rhs in-features already are).
        return 2.0 * np.prod(out.shape) * k_spatial * k_in

    return _sum_over_equations(jaxpr, flops)


def opaque_conv_flops(jaxpr) -> float:
    """Nominal FLOPs of the convolutions a closed jaxpr runs as oneDNN custom calls, which
    XLA's cost analysis counts as zero.

    Every piece does `2 × |y| × kernel window × C_in` (y: the conv's output, or its
    cotangent for the two gradients).
    """
    import numpy as np

    def flops(eqn) -> float:
        target = eqn.params.get("target_name", "") if eqn.primitive.name == "ffi_call" else ""
        if not target.startswith("vi_seg_jax_onednn_"):
            return 0.0
        shapes = [v.aval.shape for v in (*eqn.invars, *eqn.outvars)]
        if "kernel_grad" in target:  # (x, dy) -> dw
            y, kernel = shapes[1], shapes[2]
        elif "input_grad" in target:  # (dy, w) -> dx
            y, kernel = shapes[0], shapes[1]
        else:  # (x, w) -> y
            y, kernel = shapes[2], shapes[1]
        return 2.0 * np.prod(y) * np.prod(kernel[:-1])

    return _sum_over_equations(jaxpr, flops)


def _sum_over_equations(jaxpr, count) -> float:
    """`count(eqn)` summed over a jaxpr's equations and its sub-jaxprs (scan bodies times
    their length)."""
    import jax.extend

    total = 0.0
    for eqn in jaxpr.eqns:
        total += count(eqn)
        repeats = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += repeats * _sum_over_equations(sub, count)
    return total


# --------------------------------------------------------------------------- benchmark


def _peak_rss_mb() -> float:
    """The process's peak resident memory since the last `_reset_peak_rss` (Linux), else ever."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_peak_rss() -> bool:
    """Resets the peak resident memory to the current one (Linux `clear_refs`); False if not."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def attainable_gemm_flops(n: int = 4096, repeats: int = 3) -> float:
    """FLOP/s of a large fp32 matrix product through XLA on the default device, measured
    now: the machine's attainable peak (nominal cores × clock × width overstates it)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, b))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / min(times)


def _augment_seconds(config, images, labels, steps: int) -> float | None:
    """Median time of the step's augmentation alone (None without augmentation)."""
    if config is None:
        return None
    import jax

    from vi_seg_jax.data.augment import augment_batch

    augment = jax.jit(lambda key, x, y: augment_batch(key, x, y, config))
    jax.block_until_ready(augment(jax.random.key(0), images, labels))
    times = []
    for index in range(max(steps, 3)):
        t0 = time.perf_counter()
        jax.block_until_ready(augment(jax.random.key(index + 1), images, labels))
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times), 4)


def bench_backbone(name: str, args: argparse.Namespace, peak: dict[str, Any]) -> list[dict]:
    """Compiles the step under each `--conv-impl` and times them interleaved; one record each."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from vi_seg_jax.backbones import get_backbone
    from vi_seg_jax.data.augment import get_augmentation
    from vi_seg_jax.methods import MethodConfig
    from vi_seg_jax.ops import ConvEngine, clear_tuning_memory, onednn, tuning_report
    from vi_seg_jax.parallel import batch_sharded, data_mesh, replicated
    from vi_seg_jax.train.state import ModelSpec, create_train_state
    from vi_seg_jax.train.step import make_train_step

    d = args.spatial_dims
    spatial = (args.patch,) * d
    # XLA's convs for initialisation: tuning happens in the timed formulations' compiles.
    widths = {} if args.features is None else {"features": tuple(args.features)}
    backbone = get_backbone(name, num_classes=2, spatial_dims=d, conv=ConvEngine("lax"), **widths)
    spec = ModelSpec(
        backbone,
        MethodConfig(method=args.method, estimator=args.estimator, num_particles=args.particles),
        precision=args.precision,
        augment=get_augmentation(args.augment),
    )
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(args.batch, *spatial, args.channels)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 5, size=(args.batch, *spatial)), jnp.uint8)
    mesh = None
    if args.devices > 1:
        mesh = data_mesh(args.devices, batch_size=args.batch)
        images = jax.device_put(images, batch_sharded(mesh))
        labels = jax.device_put(labels, batch_sharded(mesh))
    batch = (images, labels)

    t0 = time.perf_counter()
    state0 = create_train_state(
        jax.random.key(0), spec, images, None if mesh is None else replicated(mesh)
    )
    jax.block_until_ready(state0)
    init_seconds = time.perf_counter() - t0
    augment_seconds = _augment_seconds(spec.augment, images, labels, args.steps)

    def with_conv(impl: str):
        return dataclasses.replace(spec, backbone=backbone.clone(conv=ConvEngine(impl)))

    # Nominal conv FLOPs of the same step with XLA's own convs (no rewrites).
    nominal = conv_flops(jax.make_jaxpr(make_train_step(with_conv("lax")))(state0, batch).jaxpr)

    runs = {}
    for impl in args.conv_impl:
        clear_tuning_memory()
        t0 = time.perf_counter()
        compiled = make_train_step(with_conv(impl), mesh).lower(state0, batch).compile()
        compile_seconds = time.perf_counter() - t0
        tuning = tuning_report()
        flops = _xla_flops(compiled, args.devices)
        if flops is not None:  # plus what XLA cannot see into
            step_jaxpr = jax.make_jaxpr(make_train_step(with_conv(impl), mesh))(state0, batch)
            flops += opaque_conv_flops(step_jaxpr.jaxpr)
        state = jax.tree.map(jnp.copy, state0)
        rss_reset = _reset_peak_rss()
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)  # warm-up
        jax.block_until_ready(metrics)
        first_step_seconds = time.perf_counter() - t0
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        runs[impl] = {
            "compiled": compiled,
            "memory_mb": memory_per_device_mb(compiled),
            "state": state,
            "flops": flops,
            "compile_seconds": compile_seconds - tuning.seconds,
            "tuning": tuning,
            "first_step_seconds": first_step_seconds,
            # Two steps of this formulation alone (the process's peak if it cannot be reset).
            "peak_rss_mb": round(_peak_rss_mb(), 1),
            "peak_rss_basis": "this formulation's steps" if rss_reset else "process peak so far",
            "times": [],
        }
    for _ in range(args.steps):  # interleaved: a noisy, shared machine hits all alike
        for run in runs.values():
            t0 = time.perf_counter()
            run["state"], metrics = run["compiled"](run["state"], batch)
            jax.block_until_ready(metrics)
            run["times"].append(time.perf_counter() - t0)
            run["loss"] = float(metrics["loss"])

    first = args.conv_impl[0]
    records = []
    peak_flops = peak["peak_flops"]
    for impl, run in runs.items():
        seconds = statistics.median(run["times"])
        flops = run["flops"] if run["flops"] is not None else nominal
        record = {
            "backbone": name,
            "seconds_per_step": round(seconds, 4),
            "voxels_per_second": round(args.batch * float(np.prod(spatial)) / seconds, 1),
            "peak_rss_mb": run["peak_rss_mb"],
            "peak_rss_basis": run["peak_rss_basis"],
            "flops_per_step": flops,
            "flops_source": "xla cost_analysis + oneDNN convs (nominal)"
            if run["flops"] is not None
            else "analytic conv FLOPs",
            "conv_flops_per_step": nominal,
            "achieved_gflops": round(flops / seconds / 1e9, 2),
            "fraction_of_peak": round(flops / seconds / peak_flops, 4) if peak_flops else None,
            "conv_fraction_of_peak": round(nominal / seconds / peak_flops, 4)
            if peak_flops
            else None,
            "peak_flops": peak_flops,
            "peak_basis": peak["peak_basis"],
            "attainable_peak_flops": peak.get("attainable_flops"),
            "fraction_of_attainable_peak": round(flops / seconds / peak["attainable_flops"], 4)
            if peak.get("attainable_flops")
            else None,
            "conv_fraction_of_attainable_peak": round(
                nominal / seconds / peak["attainable_flops"], 4
            )
            if peak.get("attainable_flops")
            else None,
            "patch": args.patch,
            "spatial_dims": d,
            "batch": args.batch,
            "channels": args.channels,
            "features": list(backbone.features),
            "particles": args.particles,
            "estimator": args.estimator,
            "method": args.method,
            "devices": args.devices,
            "precision": args.precision,
            "augment": args.augment,
            "augment_seconds": augment_seconds,
            "memory_per_device_mb": run["memory_mb"],
            "peak_device_memory_mb": _peak_device_memory_mb(),
            "conv_impl": impl,
            "device": peak["device"],
            "compile_seconds": round(run["compile_seconds"], 2),
            "tuning_seconds": round(run["tuning"].seconds, 2),
            "tuning_pieces": {
                "measured": run["tuning"].tuned,
                "read_from_file": run["tuning"].reused,
                "by_rule": run["tuning"].skipped_small + run["tuning"].skipped_budget,
            },
            "tuning_file": run["tuning"].file,
            "first_step_seconds": round(run["first_step_seconds"], 2),
            "init_seconds": round(init_seconds, 2),
            "step_times": [round(t, 3) for t in run["times"]],
            "loss_finite": bool(np.isfinite(run["loss"])),
            "jax": jax.__version__,
            "onednn": onednn.version(),
        }
        if impl != first:
            ratios = [a / b for a, b in zip(runs[first]["times"], run["times"], strict=True)]
            record[f"speedup_over_{first}"] = round(statistics.median(ratios), 3)
        records.append(record)
    return records


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if "jax" in sys.modules and args.devices > 1:
        raise RuntimeError("--devices must be set before jax is imported")
    if args.devices > 1:
        flag = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    import jax

    from vi_seg_jax.ops import CONV_IMPLS

    unknown = [impl for impl in args.conv_impl if impl not in CONV_IMPLS]
    if unknown:
        raise SystemExit(f"--conv-impl: unknown {unknown}; choose from {', '.join(CONV_IMPLS)}")
    if jax.default_backend() == "cpu":
        peak = cpu_peak_flops(args.clock_ghz)
        peak["device"] = f"cpu: {peak.pop('cpu')} ({os.cpu_count()} cores)"
    else:
        kind = jax.devices()[0].device_kind
        peak = {
            **gpu_peak_flops(kind, args.precision),
            "device": f"{jax.default_backend()}: {kind}",
        }
    peak["attainable_flops"] = attainable_gemm_flops()
    if args.devices > len(jax.devices()):
        raise SystemExit(f"--devices {args.devices}: only {len(jax.devices())} available")
    names = BACKBONE_NAMES if args.backbone == "all" else (args.backbone,)
    for name in names:
        for record in bench_backbone(name, args, peak):
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
