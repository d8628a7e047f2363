"""Posterior-predictive throughput and memory of `Predictor` against a plain Python loop.

Usage (from the repository root):
  python -m benchmarks.predict [--size 96] [--samples 8] [--backbone unet|vnet|fcn]
      [--features 8 16 32 64] [--window 96] [--chunk 1] [--channels 4] [--loop-samples K]
      [--repeats 3] [--seed 0] [--memory-sweep 8,64] [--shape X Y Z]

Prints one JSON line. The model is a randomly initialised VI network of the `quick` preset
(`experiments/configs.py`; `--features` overrides its channels), built with `train.build.build_spec` +
`create_train_state`: no training or checkpoint needed, and the cost of a sample does not
depend on the weights' values.

Default mode, one random N³ volume with C channels:
- `seconds`: wall time of `Predictor.predictive(volume, key)` with T samples (padding,
  transfers, the running-sum chunks, `summarize` and the copy back to NumPy), the median of
  `--repeats` runs (`times`) after a warm-up that compiles the predictor's two functions
  and `summarize`'s eager ops and runs one chunk; `compile_seconds` is that warm-up less
  one steady chunk. `voxel_samples_per_second` = N³·T / `seconds`.
- the baseline a user would write: a Python loop over samples, each a jitted single-sample
  whole-volume sliding-window function (`volume_sample_fn`, same window, same padded volume,
  sample t drawn from `fold_in(key, t)` as in `Predictor`), all maps kept in a list and
  reduced with NumPy at the end (mean, Kwon variances, entropies, mutual information). It is
  timed after its own compile, alternating with the predictor's runs, on `loop_samples`
  samples (`--loop-samples`, default min(T, 8), rounded up to whole chunks);
  `loop_seconds` is scaled per sample to T when `loop_scaled`. `speedup_vs_python_loop` is
  the median of the per-round ratios loop / predictor (robust on a shared machine). The
  script asserts that the loop's mean probability equals the predictor's over the same
  samples (the predictor's own compiled chunks, re-run for the first `loop_samples`).
  `--loop-samples 0` skips the baseline.
- `peak_rss_mb`: the process's peak resident memory (Linux `VmHWM`, else `ru_maxrss`,
  which a subprocess inherits from its parent at the fork), including the loop;
  `peak_rss_mb_predictor` is the peak before the loop ran. `--memory-sweep 8,64` first runs
  the predictor alone (`--loop-samples 0 --repeats 1`, this mode, same settings) in a fresh
  subprocess per T and adds `peak_rss_mb_by_samples` {T: MB} and `seconds_by_samples`.

`--shape X Y Z` mode instead writes one synthetic BraTS case of that grid
(`write_dataset(..., shape=...)`, in a subprocess so that its ~2 GB do not count) and times
`Predictor.predict_case` on it: loading, preprocessing (`preprocess_config_for`), the T
samples on the bucketed brain crop and the mapping of every output back onto the original
grid. The predictor is warmed up first on the same preprocessed volume (one chunk);
`voxel_samples_per_second` counts the preprocessed (brain-crop) voxels.

Measured (2-core AMD EPYC Zen 4, CPU, jax 0.10.2, load average 2.4-3.6 from another user's
work on the same cores, so times vary by up to ~1.5×; quick U-Net (8, 16, 32, 64), VI,
4 channels, window 96, chunk 1):
- default (96³, T = 8, 3 alternating rounds): `seconds` 6.10 (rounds 8.84, 6.10, 6.04),
  1.16 M voxel-samples/s, compile 9.2 s; the loop 6.45 s (6.76, 6.22, 6.45):
  `speedup_vs_python_loop` 1.02, i.e. the same speed (both run one jitted whole-volume
  sample per Python call); identical means (max |diff| 0.0). `peak_rss_mb_predictor` 1332,
  `peak_rss_mb` 1546 after the loop (+214 MB: its compiled function, maps and NumPy
  temporaries; not broken down further).
- `--memory-sweep 8,64`: peak RSS 1394 MB at T = 8, 1358 MB at T = 64 (9.3 s and 73.1 s):
  flat in T, as the running sums promise (the loop's list grows by 96³·2·4 B = 7 MB a
  sample, plus NumPy's stacked copy and temporaries at the end).
- `--samples 20 --shape 240 240 155` (`predict_case`, BraTS 1 mm grid; brain crop
  128×160×136, bucketed to 128×160×160 = 8 tiles of 96³ per sample): 147.8 s, peak RSS
  1786 MB (below a 4 GB target); warm-up 17 s; generating the case took 21 s (subprocess).
About 490 MB of every peak is the JAX runtime itself (a 16³ run peaks at 490-500 MB).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BACKBONE_NAMES = ("unet", "vnet", "fcn")
REPO_ROOT = Path(__file__).resolve().parents[1]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96, help="edge N of the N³ volume")
    parser.add_argument("--samples", type=int, default=8, help="posterior samples T")
    parser.add_argument("--backbone", default="unet", choices=BACKBONE_NAMES)
    parser.add_argument("--features", type=int, nargs="+", default=None, help="channels/level")
    parser.add_argument("--window", type=int, default=96, help="sliding-window tile edge")
    parser.add_argument("--chunk", type=int, default=1, help="samples per compiled chunk")
    parser.add_argument("--channels", type=int, default=4, help="input channels (modalities)")
    parser.add_argument(
        "--loop-samples", type=int, default=None, help="samples of the loop baseline (0: skip)"
    )
    parser.add_argument(
        "--memory-sweep",
        type=lambda v: [int(t) for t in v.split(",") if t],
        default=None,
        help="comma-separated T: peak RSS of the predictor alone, one subprocess each",
    )
    parser.add_argument(
        "--shape", type=int, nargs=3, default=None, help="predict_case on a synthetic X×Y×Z case"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.size, args.samples, args.window, args.chunk, args.channels, args.repeats) < 1:
        parser.error("--size, --samples, --window, --chunk, --channels, --repeats must be >= 1")
    if args.channels > 4:
        parser.error("--channels: at most the 4 BraTS modalities")
    if args.loop_samples is None:
        args.loop_samples = min(args.samples, 8)
    if not 0 <= args.loop_samples <= args.samples:
        parser.error("--loop-samples must be in [0, --samples]")
    if args.memory_sweep is not None and min(args.memory_sweep, default=0) < 1:
        parser.error("--memory-sweep needs positive sample counts")
    return args


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (MB): `VmHWM`, else `ru_maxrss`.

    `ru_maxrss` survives fork + exec: a child's starts at its parent's RSS at the fork, so a
    sweep run from a process holding a compiled model would report the parent's peak.
    Linux's `VmHWM` belongs to the address space, which exec replaces.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def _timed(fn, *args, **kwargs) -> tuple[Any, float]:
    import jax

    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - start


# --------------------------------------------------------------------------- the model


def build_model(args: argparse.Namespace):
    """A randomly initialised `TrainedModel` of the quick preset (VI, task "wt")."""
    import jax
    import jax.numpy as jnp

    from experiments.configs import get_config, with_overrides
    from vi_seg_jax.data.conventions import MODALITIES
    from vi_seg_jax.predict import TrainedModel
    from vi_seg_jax.train.build import build_spec
    from vi_seg_jax.train.state import create_train_state

    config = get_config(args.backbone, "quick")
    backbone = {"features": tuple(args.features)} if args.features else {}
    config = with_overrides(
        config,
        backbone=backbone,
        data={"modalities": tuple(MODALITIES[: args.channels])},
        seed=args.seed,
    )
    spec = build_spec(config, num_data=1.0)
    dummy = jnp.zeros((1, *config.data.patch_shape, args.channels), jnp.float32)
    state = create_train_state(jax.random.key(args.seed), spec, dummy)
    return TrainedModel(Path("."), config, spec, state, 0, {})


def make_predictor(model, args: argparse.Namespace, num_samples: int):
    from vi_seg_jax.predict import Predictor

    return Predictor(model, num_samples=num_samples, chunk_size=args.chunk, window_size=args.window)


def _padded(predictor, volume):
    """The bucketed volume and window `Predictor.predictive` works on."""
    import numpy as np

    shape = volume.shape[:3]
    bucketed = tuple(-(-s // predictor.bucket) * predictor.bucket for s in shape)
    padding = [(0, b - s) for b, s in zip(bucketed, shape, strict=True)] + [(0, 0)]
    return np.pad(volume, padding), predictor.window_for(bucketed)


def warm_up(predictor, volume, key) -> float:
    """Compiles what `predictive` runs for this shape (one chunk); seconds it took."""
    import jax.numpy as jnp

    from vi_seg_jax.uncertainty import summarize

    padded, window = _padded(predictor, volume)
    init, add = predictor._chunk_fn(window)
    start = time.perf_counter()
    padded = jnp.asarray(padded)
    sums, _ = _timed(init, predictor.model.state, padded, key)
    sums, _ = _timed(add, sums, predictor.model.state, padded, key, jnp.asarray(0))
    _timed(summarize, sums, predictor.model.task)  # its eager ops compile per shape too
    return time.perf_counter() - start


def predictor_mean(predictor, volume, key, num_samples: int):
    """Mean probability of the predictor's first `num_samples` samples (whole chunks)."""
    import jax.numpy as jnp
    import numpy as np

    from vi_seg_jax.uncertainty import summarize

    padded, window = _padded(predictor, volume)
    init, add = predictor._chunk_fn(window)
    state, padded = predictor.model.state, jnp.asarray(padded)
    sums = init(state, padded, key)
    for chunk in range(-(-num_samples // predictor.chunk_size)):
        sums = add(sums, state, padded, key, jnp.asarray(chunk))
    crop = tuple(slice(0, s) for s in volume.shape[:3])
    return np.asarray(summarize(sums, predictor.model.task).mean)[crop]


# --------------------------------------------------------------------------- the baseline


def numpy_predictive(maps: list) -> dict[str, Any]:
    """What a user computes from the list of T maps [*S, K] (task "wt": softmax classes)."""
    import numpy as np

    stack = np.stack(maps)  # [T, *S, K]
    mean = stack.mean(axis=0)
    tiny = np.float32(1e-12)
    entropy = -np.sum(mean * np.log(mean + tiny), axis=-1)
    expected = -np.sum(stack * np.log(stack + tiny), axis=-1).mean(axis=0)
    return {
        "mean": mean,
        "aleatoric": np.mean(stack * (1 - stack), axis=0),
        "epistemic": stack.var(axis=0),
        "entropy": entropy,
        "expected_entropy": expected,
        "mutual_information": np.maximum(entropy - expected, 0),
    }


def make_loop(predictor, volume, key):
    """The straightforward loop over `num_samples` (compiled); returns `run(num_samples)`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from vi_seg_jax.inference import volume_sample_fn
    from vi_seg_jax.uncertainty import sample_fn_for

    model = predictor.model
    padded, window = _padded(predictor, volume)
    dims = model.config.backbone.spatial_dims
    crop = tuple(slice(0, s) for s in volume.shape[:3])

    @jax.jit
    def one_sample(state, index, sample_key, image):
        return volume_sample_fn(sample_fn_for(model.spec, state), window, dims)(
            index, sample_key, image
        )

    def run(num_samples: int) -> dict[str, Any]:
        image = jnp.asarray(padded)
        maps = []
        for t in range(num_samples):
            index = jnp.asarray(t, jnp.int32)
            sample = one_sample(model.state, index, jax.random.fold_in(key, index), image)
            maps.append(np.asarray(sample))
        return {name: field[crop] for name, field in numpy_predictive(maps).items()}

    return run


def check_loop(predictor, volume, key, loop_mean, samples: int) -> float:
    """Asserts the loop's mean equals the predictor's over the same samples; max |diff|."""
    import numpy as np

    reference = predictor_mean(predictor, volume, key, samples)
    np.testing.assert_allclose(loop_mean, reference, rtol=1e-4, atol=1e-5)
    return float(np.max(np.abs(loop_mean - reference)))


# --------------------------------------------------------------------------- modes


def _settings(args: argparse.Namespace, model) -> dict[str, Any]:
    import jax

    return {
        "samples": args.samples,
        "backbone": args.backbone,
        "features": list(model.config.backbone.features),
        "window": args.window,
        "chunk": args.chunk,
        "channels": args.channels,
        "method": model.config.method.method,
        "device": f"{jax.default_backend()}: {jax.devices()[0].device_kind} "
        f"({os.cpu_count()} cores)",
        "jax": jax.__version__,
    }


def loop_samples(predictor, args: argparse.Namespace) -> int:
    """`--loop-samples` rounded up to whole chunks (at most T), so the means compare."""
    chunk = predictor.chunk_size
    return min(-(-args.loop_samples // chunk) * chunk, args.samples)


def bench_volume(args: argparse.Namespace, model) -> dict[str, Any]:
    """Predictor and loop baseline on one random N³ volume, timed in alternation."""
    import jax
    import numpy as np

    rng = np.random.default_rng(args.seed)
    volume = rng.normal(size=(*(args.size,) * 3, args.channels)).astype(np.float32)
    key = jax.random.key(args.seed)
    predictor = make_predictor(model, args, args.samples)
    warm_seconds = warm_up(predictor, volume, key)
    out, first = _timed(predictor.predictive, volume, key)
    record: dict[str, Any] = {"mode": "volume", "size": args.size}
    record["peak_rss_mb_predictor"] = _peak_rss_mb()  # before the loop baseline runs
    times, loop_times = [first], []
    if args.loop_samples:
        samples = loop_samples(predictor, args)
        run = make_loop(predictor, volume, key)
        _, loop_warm = _timed(run, 1)
        loop, seconds = _timed(run, samples)
        loop_times.append(seconds)
    for _ in range(args.repeats - 1):  # alternate: a noisy, shared machine hits both alike
        times.append(_timed(predictor.predictive, volume, key)[1])
        if args.loop_samples:
            loop_times.append(_timed(run, samples)[1])
    seconds = statistics.median(times)
    chunks = -(-args.samples // predictor.chunk_size)
    record.update(
        seconds=round(seconds, 3),
        voxel_samples_per_second=round(args.size**3 * args.samples / seconds, 1),
        compile_seconds=round(max(warm_seconds - seconds / chunks, 0.0), 2),
        times=[round(t, 3) for t in times],
        mean_finite=bool(np.isfinite(out.mean).all()),
    )
    if args.loop_samples:
        scale = args.samples / samples
        ratios = [scale * b / a for a, b in zip(times, loop_times, strict=True)]
        record.update(
            speedup_vs_python_loop=round(statistics.median(ratios), 3),
            loop_seconds=round(scale * statistics.median(loop_times), 3),
            loop_samples=samples,
            loop_scaled=samples != args.samples,
            loop_times=[round(t, 3) for t in loop_times],
            loop_compile_seconds=round(
                max(loop_warm - statistics.median(loop_times) / samples, 0), 2
            ),
            mean_max_abs_diff=check_loop(predictor, volume, key, loop["mean"], samples),
        )
    record["peak_rss_mb"] = _peak_rss_mb()
    return record


def _write_case(root: Path, shape: tuple[int, ...], seed: int) -> None:
    """One synthetic case, generated in a subprocess (its memory stays out of our peak)."""
    code = (
        "import sys; from vi_seg_jax.data.synthetic import write_dataset; "
        "write_dataset(sys.argv[1], num_cases=1, shape=tuple(map(int, sys.argv[2:5])), "
        "seed=int(sys.argv[5]))"
    )
    argv = [sys.executable, "-c", code, str(root), *map(str, shape), str(seed)]
    subprocess.run(argv, check=True, cwd=REPO_ROOT)


def bench_case(args: argparse.Namespace, model) -> dict[str, Any]:
    """`predict_case` on one synthetic case of grid `--shape`."""
    import numpy as np

    from vi_seg_jax.data.discovery import discover_cases
    from vi_seg_jax.data.loading import load_case
    from vi_seg_jax.data.preprocess import preprocess
    from vi_seg_jax.predict import case_key
    from vi_seg_jax.train.build import preprocess_config_for

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        start = time.perf_counter()
        _write_case(root, tuple(args.shape), args.seed)
        generate_seconds = time.perf_counter() - start
        case = discover_cases(root).cases[0]
        predictor = make_predictor(model, args, args.samples)
        volumes = load_case(case, model.config.data.modalities, with_label=False)
        prepared = preprocess(volumes.image, None, preprocess_config_for(model.config))
        preprocessed_shape = list(prepared.image.shape[:3])
        key = case_key(model.config.seed, case.case_id)
        warm_seconds = warm_up(predictor, prepared.image, key)
        del volumes, prepared
        start = time.perf_counter()
        out = predictor.predict_case(case, progress=False)  # NumPy outputs: synchronous
        seconds = time.perf_counter() - start
    voxels = math.prod(preprocessed_shape)
    return {
        "mode": "case",
        "shape": list(args.shape),
        "preprocessed_shape": preprocessed_shape,
        "seconds": round(seconds, 3),
        "voxel_samples_per_second": round(voxels * args.samples / seconds, 1),
        "warm_up_seconds": round(warm_seconds, 2),
        "generate_seconds": round(generate_seconds, 2),
        "probabilities_finite": bool(np.isfinite(out.probabilities).all()),
        "peak_rss_mb": _peak_rss_mb(),
    }


def memory_sweep(args: argparse.Namespace, samples: list[int]) -> dict[str, Any]:
    """Runs the predictor alone in a fresh subprocess per T; their peaks and times."""
    peaks, times = {}, {}
    for t in samples:
        argv = [
            sys.executable, "-m", "benchmarks.predict",
            "--size", str(args.size), "--samples", str(t), "--backbone", args.backbone,
            "--window", str(args.window), "--chunk", str(args.chunk),
            "--channels", str(args.channels), "--seed", str(args.seed), "--loop-samples", "0", "--repeats", "1",
        ]  # fmt: skip
        if args.features:
            argv += ["--features", *map(str, args.features)]
        done = subprocess.run(argv, check=True, cwd=REPO_ROOT, capture_output=True, text=True)
        child = json.loads(done.stdout.strip().splitlines()[-1])
        peaks[str(t)], times[str(t)] = child["peak_rss_mb"], child["seconds"]
    return {"peak_rss_mb_by_samples": peaks, "seconds_by_samples": times}


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    # The sweep first, before this process grows: it only waits for its children.
    sweep = memory_sweep(args, args.memory_sweep) if args.memory_sweep else {}
    model = build_model(args)
    record = bench_case(args, model) if args.shape is not None else bench_volume(args, model)
    record.update(sweep)
    record.update(_settings(args, model))
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
