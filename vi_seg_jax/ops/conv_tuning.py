"""Which formulation computes each piece of a 3D conv: measured once per machine, then read.

`piece_form` times the candidates of a piece (`conv_forms.FORWARD` for the forward pass and
the input gradient, `conv_forms.KERNEL_GRAD` for the kernel gradient) the first time a
(machine, jax version, shape, dtype) is seen and records the fastest in a JSON file in the
cache folder (`tuning_file()`), the way cuDNN's benchmark mode and XLA's GPU autotuner work;
later traces and processes read it. Tuning is bounded by a time budget per process and
skipped for convs too small to repay it (they use `rule_form`); a candidate whose compiled
memory exceeds a budget is not timed. Environment variables:

- `VI_SEG_JAX_CONV_FORMULATION`: force one formulation for every "auto" conv (`"xla"`,
  `"summed"`, `"stacked"`, `"gemm"`, `"onednn"`), or `"rule"` for the size rule without
  tuning;
- `VI_SEG_JAX_CONV_TUNING_SECONDS`: the tuning budget per process (default 300; 0 never
  tunes, entries already recorded are still used);
- `VI_SEG_JAX_CONV_MEMORY_MB`: the memory budget of one candidate (default: an eighth of
  the machine's memory). It also applies to recorded entries: a lower budget picks the
  fastest recorded formulation within it, without retuning.

A multi-process run never tunes (its processes must trace the same program): it uses
recorded entries and the rule.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from vi_seg_jax.errors import DataError
from vi_seg_jax.io.folders import cache_root, write_text_atomic
from vi_seg_jax.ops import onednn
from vi_seg_jax.ops.conv_forms import (
    FORWARD,
    FORWARD_FORMS,
    KERNEL_GRAD,
    KERNEL_GRAD_FORMS,
    ConvChoice,
    input_grad_pads,
)

ENV_FORMULATION = "VI_SEG_JAX_CONV_FORMULATION"
ENV_BUDGET = "VI_SEG_JAX_CONV_TUNING_SECONDS"
ENV_MEMORY = "VI_SEG_JAX_CONV_MEMORY_MB"
DEFAULT_BUDGET_SECONDS = 300.0
# Convs below this many FLOPs per piece use the rule: timing them costs more than it saves.
MIN_TUNED_FLOPS = 1e9
# 2: oneDNN's convolutions are candidates (entries measured without them are stale).
TUNING_FORMAT = 2
# Slab-wise kernel gradients with more slabs than this are not candidates: compile time grows
# with the slab count (128 one-slice slabs at 128³ took longer to compile than to tune).
MAX_SLABS = 32

# The size rule used where nothing was measured (first measured on a 2-core AMD Zen 4 in the
# paper U-Net's LRT step): stack the depth taps into the channels while `K0 * C_in` is at
# most this, ...
STACK_MAX_CHANNELS = 24
# ... and use GEMMs for convs with at least this many output voxels or 2-tap kernels (the
# strided rewrite's), 2D convs for the small levels.
GEMM_MIN_VOXELS = 2 * 48**3


def conv_flops(x_shape, w_shape, pads) -> float:
    """Nominal FLOPs (2 per multiply-add) of one stride-1 conv (= each of its gradients)."""
    return 2.0 * math.prod(_out_shape(x_shape, w_shape, pads)) * math.prod(w_shape)


def rule_form(x_shape, w_shape, pads, piece: str, backend: str, dtype="float32") -> str:
    """The formulation used where nothing was measured: XLA's conv off CPUs; on CPUs oneDNN
    where it is available (it was fastest for every measured conv of the paper U-Net but
    one, within 12% there), else GEMMs for large convs and 2D convs for small ones (stacked
    taps for few input channels). XLA:CPU has no bfloat16 matrix product accumulating in
    float32 for every layout, so low-precision kernel gradients keep XLA's conv there."""
    if backend != "cpu" or (piece == "kernel_grad" and jnp.finfo(dtype).bits < 32):
        return "xla"
    if onednn.available(dtype):
        return "onednn"
    stacked = w_shape[0] * w_shape[-2] <= STACK_MAX_CHANNELS
    if math.prod(_out_shape(x_shape, w_shape, pads)) >= GEMM_MIN_VOXELS or max(w_shape[:3]) == 2:
        return "gemm" if stacked or piece == "kernel_grad" else "summed"
    return "stacked" if stacked else "summed"


@dataclasses.dataclass
class TuningReport:
    """What tuning did in this process: seconds spent, pieces timed, read from the file."""

    seconds: float = 0.0
    tuned: int = 0
    reused: int = 0
    skipped_small: int = 0
    skipped_budget: int = 0
    file: str = ""


class _Tuner:
    """This process's view of the tuning file, and what tuning did so far."""

    def __init__(self) -> None:
        self.table: dict[str, dict] | None = None  # the file's entries, once read
        self.report = TuningReport()
        self.warned = False

    def entries(self) -> dict[str, dict]:
        if self.table is None:
            data = _read_tuning_file()
            self.table = dict(data.get("entries", {}))
        return self.table


_TUNER = _Tuner()


def tuning_report() -> TuningReport:
    """A copy of this process's tuning statistics."""
    return dataclasses.replace(_TUNER.report, file=str(tuning_file()))


def clear_tuning_memory() -> None:
    """Forgets the entries read from the tuning file and the statistics (not the file)."""
    global _TUNER
    _TUNER = _Tuner()


def machine_description() -> dict[str, str]:
    """What a measurement depends on: backend and device (CPU model, ISA flags, cores), jax."""
    device = jax.devices()[0]
    desc = {
        "backend": jax.default_backend(),
        "device": device.device_kind,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
    }
    if desc["backend"] == "cpu":
        info = cpu_info()
        flags = sorted(
            f for f in info.get("flags", "").split() if f.startswith(("avx", "fma", "amx"))
        )
        desc["device"] = info.get("model name") or platform.processor() or platform.machine()
        desc["isa"] = " ".join(flags)
        desc["onednn"] = onednn.version() or "none"
        desc["cores"] = str(
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        )
    return desc


def cpu_info() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where unavailable)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if info:
                        break
                    continue
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


@functools.cache
def _machine() -> tuple[dict[str, str], str]:
    desc = machine_description()
    digest = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]
    return desc, digest


def tuning_file() -> Path:
    """This machine's tuning file: `<cache>/conv3d_tuning/<machine digest>.json`."""
    return cache_root() / "conv3d_tuning" / f"{_machine()[1]}.json"


def check_settings() -> None:
    """Checks the environment variables above; a bad value is a `DataError` naming it."""
    _forced_formulation()
    _env_number(ENV_BUDGET, DEFAULT_BUDGET_SECONDS)
    _env_number(ENV_MEMORY, 0.0)


def _forced_formulation() -> str:
    forced = os.environ.get(ENV_FORMULATION, "").strip()
    if forced and forced != "rule" and forced not in FORWARD_FORMS:
        raise DataError(
            ENV_FORMULATION, f"expected one of {', '.join(FORWARD_FORMS)} or rule, got {forced!r}"
        )
    if forced == "onednn" and not onednn.available():
        raise DataError(
            ENV_FORMULATION,
            f"onednn needs the oneDNN library (onednn-cpu-gomp, or {onednn.ENV_LIBRARY}) "
            "and the CPU backend",
        )
    return forced


def _env_number(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise DataError(name, f"expected a number >= 0, got {text!r}")
    return value


def piece_form(piece: str, x_shape, w_shape, pads, dtype) -> str:
    """The formulation of one piece ("forward", also for input gradients, or "kernel_grad")
    of a stride-1 3D conv on this machine: `VI_SEG_JAX_CONV_FORMULATION` if set, else the
    tuning file's entry, measured now when the conv is large enough and the budget allows,
    else the rule."""
    forced = _forced_formulation()
    if forced and forced != "rule":
        return forced
    return _piece(
        piece,
        tuple(map(int, x_shape)),
        tuple(map(int, w_shape)),
        tuple((int(lo), int(hi)) for lo, hi in pads),
        jnp.dtype(dtype).name,
        tune=forced != "rule",
    )


def conv_choice(x_shape, w_shape, pads, dtype) -> ConvChoice:
    """`piece_form` of all three pieces of a stride-1 3D conv (the input gradient is the conv
    of the output gradient with the flipped, transposed kernel)."""
    pads_t = input_grad_pads(w_shape, pads)
    dy_shape = (*_out_shape(x_shape, w_shape, pads), w_shape[-1])
    wt_shape = (*w_shape[:3], w_shape[-1], w_shape[-2])
    return ConvChoice(
        piece_form("forward", x_shape, w_shape, pads, dtype),
        piece_form("forward", dy_shape, wt_shape, pads_t, dtype),
        piece_form("kernel_grad", x_shape, w_shape, pads, dtype),
    )


def _out_shape(x_shape, w_shape, pads) -> tuple[int, ...]:
    """(batch, *spatial) of a stride-1 conv's output."""
    spatial = (
        n + lo + hi - k + 1 for n, (lo, hi), k in zip(x_shape[1:4], pads, w_shape[:3], strict=True)
    )
    return (x_shape[0], *spatial)


def _piece(piece, x_shape, w_shape, pads, dtype, tune: bool) -> str:
    key = f"{piece} x={list(x_shape)} w={list(w_shape)} pads={[list(p) for p in pads]} {dtype}"
    backend = jax.default_backend()
    table, report = _TUNER.entries(), _TUNER.report
    if key in table:
        report.reused += 1
        return fastest_within_budget(table[key])
    rule = rule_form(x_shape, w_shape, pads, piece, backend, dtype)
    if not tune or conv_flops(x_shape, w_shape, pads) < MIN_TUNED_FLOPS:
        report.skipped_small += 1
        return rule
    if report.seconds >= _env_number(ENV_BUDGET, DEFAULT_BUDGET_SECONDS) or jax.process_count() > 1:
        report.skipped_budget += 1
        return rule
    start = time.perf_counter()
    with jax.ensure_compile_time_eval():  # measure now, even while a caller is being traced
        entry = _measure(piece, x_shape, w_shape, pads, dtype)
    report.seconds += time.perf_counter() - start
    report.tuned += 1
    _record(key, entry)
    return fastest_within_budget(entry)


def _read_tuning_file() -> dict:
    try:
        data = json.loads(tuning_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("format") == TUNING_FORMAT else {}


def _record(key: str, entry: dict) -> None:
    """Adds an entry to the table and the file (merged with entries other processes wrote)."""
    _TUNER.entries()[key] = entry
    data = _read_tuning_file() or {"format": TUNING_FORMAT, "machine": _machine()[0]}
    data.setdefault("entries", {})[key] = entry
    try:
        write_text_atomic(tuning_file(), json.dumps(data, indent=1, sort_keys=True) + "\n")
    except OSError as error:  # a read-only cache: this process still uses what it measured
        if not _TUNER.warned:
            _TUNER.warned = True
            warnings.warn(
                f"cannot write the convolution tuning file {tuning_file()}: {error}; "
                "measurements are kept for this process only",
                stacklevel=2,
            )


def _memory_budget_bytes() -> float:
    if os.environ.get(ENV_MEMORY):
        return _env_number(ENV_MEMORY, 0.0) * 2**20
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 8
    except (ValueError, OSError, AttributeError):
        return 2.0 * 2**30


def _measure(piece, x_shape, w_shape, pads, dtype) -> dict:
    """Times each candidate of a piece (compiled alone, best of 3 after a warm-up)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape), dtype)
    if piece == "forward":
        other = jnp.asarray(rng.normal(size=w_shape), dtype)
        forms = FORWARD_FORMS
        make = lambda form: lambda x, w: FORWARD[form](x, w, pads, None, None)  # noqa: E731
    else:
        out_shape = _out_shape(x_shape, w_shape, pads)
        other = jnp.asarray(rng.normal(size=(*out_shape, w_shape[-1])), dtype)
        slices = out_shape[1]
        forms = [
            f for f in KERNEL_GRAD_FORMS if "@" not in f or -(-slices // _slab(f)) <= MAX_SLABS
        ]
        make = lambda form: lambda x, dy: KERNEL_GRAD[form](x, dy, w_shape, pads, None)  # noqa: E731
    forms = [f for f in forms if f != "onednn" or onednn.available(dtype)]
    budget = _memory_budget_bytes()
    seconds, memory = {}, {}
    print(
        f"vi_seg_jax: timing 3D conv formulations for {piece} x{list(x_shape)} "
        f"w{list(w_shape)} (once per machine)",
        file=sys.stderr,
        flush=True,
    )
    for form in forms:
        try:
            compiled = jax.jit(make(form)).lower(x, other).compile()
            stats = compiled.memory_analysis()
            need = None if stats is None else stats.temp_size_in_bytes + stats.output_size_in_bytes
            memory[form] = None if need is None else round(need / 2**20, 1)
            if need is not None and need > budget:
                continue
            jax.block_until_ready(compiled(x, other))
        except jax.errors.JaxRuntimeError:  # not supported here (e.g. a dtype): no candidate
            memory[form] = None
            continue
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(x, other))
            times.append(time.perf_counter() - t0)
        seconds[form] = min(times)
    return {"seconds": seconds, "memory_mb": memory, "flops": conv_flops(x_shape, w_shape, pads)}


def _slab(form: str) -> int:
    """Output slices per slab of a slab-wise kernel gradient ("summed@4"), 1 otherwise."""
    return int(form.split("@")[1]) if "@" in form else 1


def fastest_within_budget(entry: dict) -> str:
    """The fastest measured formulation of an entry whose memory is within today's budget
    (so the budget can be lowered without retuning), else the one needing least memory."""
    budget_mb = _memory_budget_bytes() / 2**20
    memory = entry.get("memory_mb", {})
    fits = {f: t for f, t in entry["seconds"].items() if (memory.get(f) or 0.0) <= budget_mb}
    if fits:
        return min(fits, key=fits.get)
    known = [f for f, mb in memory.items() if mb is not None] or ["xla"]
    return min(known, key=lambda f: memory.get(f) or 0.0)
