"""Prediction with a trained run: whole volumes, uncertainty maps, files on the source grid.

`load_trained(path)` restores a trained model from a training workdir or an exported archive
(`run_folder`, `model_archive`). `fit_temperatures`
fits them on validation cases with the `Predictor` settings that prediction uses (samples,
windows), so the temperature calibrates the very predictive it is applied to. `predict_case` runs
T posterior samples over the whole preprocessed volume (Gaussian sliding windows, one
network per sample for every tile, a key fixed by the seed and the case id) and maps every
output back onto the case's original grid. `write_case` writes the files. `predict_folder`
predicts a case folder, a dataset or one of the run's splits into an output folder and
records what it did in `prediction.json` (`evaluation.prediction_record`, read back by
`evaluation.PredictionRun`); `experiments.predict` is its command line.

Which predictive each output describes, per region (WT for `task="wt"`; WT, TC, ET for
`task="regions"`), with p̄ the Monte Carlo mean of the samples and T the temperature:
- `probabilities` (`_prob`) is the calibrated σ(logit(p̄) / T); the segmentation thresholds it
  at ½ (the same voxels as p̄ > ½);
- `uncertainty` (`_unc_<region>`, QU-BraTS) is the normalised binary entropy of that
  calibrated probability, 100 · H / log 2 ∈ [0, 100];
- `uncalibrated` (`_prob_uncalibrated`, written when a temperature is applied) is p̄ itself;
- `aleatoric` and `epistemic` (Kwon et al.) split the variance of the samples, whose mean is
  p̄: aleatoric + epistemic = p̄(1 − p̄), the uncalibrated probability's variance.

Test-time augmentation (`Predictor(tta="flips")`): every sample is also evaluated on each
mirroring of the spatial axes (8 in 3D, 4 for a 2D backbone's axial slices; the cost is that
many times the samples'), flipped back, and p̄ is the mean over all (sample, flip) pairs, so
the probabilities, segmentation and QU-BraTS maps include the flips. The variance then
splits three ways (`uncertainty.TTAPredictive`): aleatoric, epistemic (within a flip, across
samples; 0 for a single deterministic network) and `tta` (`_tta`, across the flips' means),
with aleatoric + epistemic + tta = p̄(1 − p̄). The temperatures, fitted without TTA, are
applied as they are; `tta` is recorded with the settings.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from vi_seg_jax.calibration import (
    apply_temperature,
    calibrate,
    region_probabilities,
    region_truth,
)
from vi_seg_jax.data.cache import PreparedCase
from vi_seg_jax.data.discovery import CaseFiles, discover_cases
from vi_seg_jax.data.loading import load_case
from vi_seg_jax.data.preprocess import preprocess, to_original_grid
from vi_seg_jax.errors import DataError
from vi_seg_jax.evaluation import PREDICTION_FILE, prediction_record
from vi_seg_jax.inference import WindowConfig, volume_sample_fn
from vi_seg_jax.io.folders import write_json_atomic
from vi_seg_jax.io.nifti import read_nifti_header, write_nifti
from vi_seg_jax.model_archive import is_model_archive, load_archive
from vi_seg_jax.parallel import batch_sharded, is_primary, replicated
from vi_seg_jax.run_folder import TrainedModel, read_run, read_splits
from vi_seg_jax.task import get_task
from vi_seg_jax.train.build import backbone_multiple, preprocess_config_for
from vi_seg_jax.uncertainty import (
    Predictive,
    PredictiveSums,
    TTAPredictive,
    TTASums,
    add_samples,
    add_samples_per_device,
    close_flip,
    empty_sums,
    empty_tta_sums,
    flipped_sample_fn,
    mirror_flips,
    num_chunks,
    sample_fn_for,
    sum_devices,
    summarize,
    summarize_tta,
)

# Preprocessed volumes are zero-padded up to a multiple of this per axis, so that cases of
# similar size share one compiled predictor.
SHAPE_BUCKET = 32
DEFAULT_WINDOW = 96
TTA_MODES = ("none", "flips")  # test-time augmentation: none, or every mirroring


def load_trained(path: str | Path, step: int | None = None) -> TrainedModel:
    """A trained model from a training workdir (`run_folder.read_run`) or an exported archive
    (`model_archive.load_archive`): the best (or given) checkpoint with its temperatures."""
    if is_model_archive(path):
        return load_archive(path, step)
    return read_run(path, step)


def case_key(seed: int, case_id: str) -> jax.Array:
    """The key that fixes every Monte Carlo sample of one case."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(case_id.encode()))


@dataclasses.dataclass(frozen=True)
class CasePrediction:
    """Outputs on the case's original grid.

    Attributes:
      labels: [X, Y, Z] canonical classes (`task="regions"`) or 0/1 whole tumour (`"wt"`).
      probabilities: [X, Y, Z, R] calibrated per-region predictive probabilities.
      uncalibrated: [X, Y, Z, R] the Monte Carlo mean p̄ before the temperature; None when
        no temperature is applied (then `probabilities` is p̄).
      uncertainty: [X, Y, Z, R] QU-BraTS uncertainty in [0, 100].
      aleatoric, epistemic: [X, Y, Z, R] Kwon et al. split of the samples' variance:
        aleatoric + epistemic (+ tta) = p̄(1 − p̄) of `uncalibrated`.
      mutual_information: [X, Y, Z] epistemic entropy part (nats).
      image: [X, Y, Z, C] the input; truth: [X, Y, Z] canonical classes or None.
      task: the run's task (`vi_seg_jax.task`), which decides how labels are written.
      tta: [X, Y, Z, R] the variance across the flips' means (test-time augmentation);
        None without TTA. `epistemic` is then the variance within a flip.
    """

    case: CaseFiles
    labels: np.ndarray
    probabilities: np.ndarray
    uncalibrated: np.ndarray | None
    uncertainty: np.ndarray
    aleatoric: np.ndarray
    epistemic: np.ndarray
    mutual_information: np.ndarray
    image: np.ndarray
    truth: np.ndarray | None
    affine: np.ndarray
    reference: Path
    task: str = "wt"
    tta: np.ndarray | None = None


class Predictor:
    """Compiled posterior-predictive chunks for one model and window (cached per shape).

    `tta="flips"`: every sample is evaluated on each mirroring of the spatial axes (8 in 3D,
    4 for a 2D backbone), flip by flip (all samples under the first flip, then under the
    next, ...; sample t is the same network under every flip), so the cost is F times the
    samples' and memory is that of one flip's running state. See the module docstring.
    """

    def __init__(
        self,
        model: TrainedModel,
        *,
        num_samples: int | None = None,
        chunk_size: int = 1,
        window_size: int = DEFAULT_WINDOW,
        overlap: float = 0.25,
        tile_batch: int = 1,
        mesh: Mesh | None = None,
        tta: str = "none",
    ):
        if tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
        self.model = model
        self.mesh = mesh if mesh is not None and mesh.size > 1 else None
        self.devices = 1 if self.mesh is None else self.mesh.size
        self.state = (
            model.state if self.mesh is None else jax.device_put(model.state, replicated(self.mesh))
        )
        self.num_samples = num_samples or model.default_samples()
        self.chunk_size = min(chunk_size, self.num_samples)
        multiple = backbone_multiple(model.config)
        self.window_size = max(multiple, window_size // multiple * multiple)
        self.bucket = max(SHAPE_BUCKET, multiple)
        self.overlap = overlap
        self.tile_batch = tile_batch
        self.tta = tta
        # Mirrorings of the volume [X, Y, Z, C]: a 2D backbone's slices are not flipped in Z.
        spatial = tuple(range(model.config.backbone.spatial_dims))
        self.flips = None if tta == "none" else mirror_flips(spatial)
        self._compiled: dict[WindowConfig, tuple[Callable, Callable]] = {}
        self._flip_fns: tuple[Callable, Callable] | None = None

    @property
    def num_flips(self) -> int:
        """F: evaluations of each sample (1 without TTA)."""
        return 1 if self.flips is None else len(self.flips)

    def settings(self) -> dict:
        """What decides the predictive: samples, sliding windows and TTA (recorded with outputs).

        `tta` is there only when it is not "none", so settings recorded before TTA existed
        (`calibration.json`) still equal those of a predictor without it.
        """
        settings = {
            "samples": self.num_samples,
            "window": self.window_size,
            "overlap": self.overlap,
        }
        return settings if self.tta == "none" else {**settings, "tta": self.tta}

    def window_for(self, shape: tuple[int, ...]) -> WindowConfig:
        """Cubic tiles (3D, at most the volume) or whole axial slices (2D backbones)."""
        if self.model.config.backbone.spatial_dims == 2:
            return WindowConfig((shape[0], shape[1], 1), self.overlap, tile_batch=self.tile_batch)
        window = tuple(min(self.window_size, s) for s in shape)
        return WindowConfig(window, self.overlap, tile_batch=self.tile_batch)

    def _chunk_fn(self, window: WindowConfig) -> Callable:
        if window not in self._compiled:
            spec, task = self.model.spec, self.model.task
            dims = self.model.config.backbone.spatial_dims

            # Several VI samples or ensemble members at once vmap per-sample kernels. MC
            # dropout shares its weights, so vmapped samples simply fold into the batch of
            # the usual convolutions.
            batched = self.chunk_size > 1 and spec.strategy.samples_own_kernels
            add_spec = spec.for_batched_kernels() if batched else spec

            def add(sums, state, volume, key, chunk, flip=None):
                sample_fn = volume_sample_fn(sample_fn_for(add_spec, state), window, dims)
                if flip is not None:  # TTA: `self.flips[flip]` (one compiled function)
                    sample_fn = flipped_sample_fn(sample_fn, self.flips, flip)
                sizes = dict(chunk_size=self.chunk_size, num_samples=self.num_samples, task=task)
                if self.mesh is None:
                    return add_samples(sums, sample_fn, volume, key, chunk, **sizes)
                return add_samples_per_device(
                    self.mesh, sums, sample_fn, volume, key, chunk, **sizes
                )

            def init(state, volume, key):
                sample_fn = volume_sample_fn(sample_fn_for(spec, state), window, dims)
                sums = empty_sums(sample_fn, volume, key)
                if self.mesh is None:
                    return sums
                # One set of running sums per device, stacked along the mesh axis.
                stack = lambda x: jnp.broadcast_to(x, (self.devices, *x.shape))  # noqa: E731
                return jax.tree_util.tree_map(stack, sums)

            shardings = {} if self.mesh is None else {"out_shardings": batch_sharded(self.mesh)}
            self._compiled[window] = (
                jax.jit(init, **shardings),
                jax.jit(add, donate_argnums=(0,)),
            )
        return self._compiled[window]

    def _tta_fns(self) -> tuple[Callable, Callable]:
        """Jitted `(flip sums) -> no flips` and `(TTA sums, flip sums) -> flip closed`."""
        if self._flip_fns is None:
            task = self.model.task

            def pooled(sums: PredictiveSums) -> PredictiveSums:  # over the devices' stack
                return sums if self.mesh is None else sum_devices(sums)

            def start(sums: PredictiveSums) -> TTASums:
                return empty_tta_sums(pooled(sums))

            def close(tta: TTASums, sums: PredictiveSums) -> TTASums:
                return close_flip(tta, pooled(sums), task)

            self._flip_fns = (jax.jit(start), jax.jit(close, donate_argnums=(0,)))
        return self._flip_fns

    def predictive(
        self, volume: np.ndarray, key: jax.Array, *, progress: Callable | None = None
    ) -> Predictive | TTAPredictive:
        """The predictive maps of one preprocessed volume [X, Y, Z, C] on its own grid.

        `progress(n)` is told the evaluations done so far, of samples × flips.
        """
        shape = volume.shape[:3]
        bucketed = tuple(-(-s // self.bucket) * self.bucket for s in shape)
        padding = [(0, b - s) for b, s in zip(bucketed, shape, strict=True)] + [(0, 0)]
        padded = np.pad(volume, padding)
        window = self.window_for(bucketed)
        init, add = self._chunk_fn(window)
        state, padded = self.state, jnp.asarray(padded)
        per_step = self.chunk_size * self.devices
        steps = num_chunks(self.num_samples, per_step)
        if self.flips is None:
            sums = init(state, padded, key)
            for step in range(steps):
                sums = add(sums, state, padded, key, jnp.asarray(step))
                if progress is not None:
                    progress(min((step + 1) * per_step, self.num_samples))
            out = summarize(sums if self.mesh is None else sum_devices(sums), self.model.task)
        else:
            start, close = self._tta_fns()
            tta = start(init(state, padded, key))
            for flip in range(self.num_flips):  # flip by flip: one flip's sums at a time
                sums = init(state, padded, key)
                for step in range(steps):
                    sums = add(sums, state, padded, key, jnp.asarray(step), jnp.asarray(flip))
                    if progress is not None:
                        done = min((step + 1) * per_step, self.num_samples)
                        progress(flip * self.num_samples + done)
                tta = close(tta, sums)
            out = summarize_tta(tta, self.model.task)
        crop = tuple(slice(0, s) for s in shape)
        return type(out)(*(np.asarray(field)[crop] for field in out))

    def predict_case(self, case: CaseFiles, *, progress: bool = True) -> CasePrediction:
        """Loads, preprocesses and predicts one case; outputs on its original grid."""
        config = self.model.config
        volumes = load_case(case, config.data.modalities, with_label=True)
        prepared = preprocess(volumes.image, volumes.label, preprocess_config_for(config))
        key = case_key(config.seed, case.case_id)
        with tqdm(
            total=self.num_samples * self.num_flips,
            desc=case.case_id,
            unit="sample",
            disable=None if progress else True,
            leave=False,
        ) as bar:
            out = self.predictive(prepared.image, key, progress=lambda n: bar.update(n - bar.n))
        return self._to_case(case, volumes, prepared.mapping, out)

    def _to_case(self, case, volumes, mapping, out: Predictive | TTAPredictive) -> CasePrediction:
        task, names = get_task(self.model.task), self.model.regions
        temperatures = np.array([self.model.temperatures.get(r, 1.0) for r in names])
        mean = task.region_probabilities(np.asarray(out.mean, np.float32))
        calibrated = bool(np.any(temperatures != 1.0))
        probs = apply_temperature(mean, temperatures) if calibrated else mean

        def original(array, fill=0):
            return to_original_grid(np.asarray(array), mapping, fill=fill)

        probabilities = original(probs)
        labels = task.labels(probabilities > 0.5)
        return CasePrediction(
            case=case,
            labels=labels,
            probabilities=probabilities,
            uncalibrated=original(mean) if calibrated else None,
            uncertainty=qubrats_uncertainty(probabilities),
            aleatoric=original(task.region_probabilities(np.asarray(out.aleatoric))),
            epistemic=original(task.region_probabilities(np.asarray(out.epistemic))),
            mutual_information=original(out.mutual_information),
            image=volumes.image,
            truth=volumes.label,
            affine=volumes.affine,
            reference=volumes.reference,
            task=task.name,
            tta=(
                original(task.region_probabilities(np.asarray(out.tta)))
                if isinstance(out, TTAPredictive)
                else None
            ),
        )


def fit_temperatures(predictor: Predictor, cases: list[PreparedCase]) -> dict:
    """Temperatures (and ECEs, `calibration.calibrate`) of the predictor on prepared cases.

    Each case is predicted as `predict` would (`predict_case`'s key, the predictor's
    samples and windows); the settings are returned under `predictor`.
    """
    model = predictor.model
    probs, truths, masks = [], [], []
    for case in cases:
        key = case_key(model.config.seed, case.case_id)
        out = predictor.predictive(np.asarray(case.image), key)
        probs.append(region_probabilities(out.mean, model.task))
        truths.append(region_truth(np.asarray(case.label), model.task))
        masks.append(np.asarray(case.mask))
    return {**calibrate(probs, truths, masks, model.task), "predictor": predictor.settings()}


def qubrats_uncertainty(probabilities: np.ndarray) -> np.ndarray:
    """100 · H(p) / log 2 per region: the QU-BraTS [0, 100] uncertainty, uint8."""
    p = np.clip(np.asarray(probabilities, np.float64), 1e-12, 1 - 1e-12)
    bits = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return np.rint(100.0 * bits).astype(np.uint8)


def output_paths(out_dir: Path, case_id: str, regions: tuple[str, ...]) -> dict[str, Path]:
    """The files `write_case` writes for one case, by role."""
    names = {
        "seg": "seg",
        **{f"unc_{r}": f"unc_{r}" for r in regions},
        "aleatoric": "aleatoric",
        "epistemic": "epistemic",
        "prob": "prob",
        "prob_uncalibrated": "prob_uncalibrated",
        "tta": "tta",
    }
    paths = {role: out_dir / f"{case_id}_{suffix}.nii.gz" for role, suffix in names.items()}
    paths["overview"] = out_dir / f"{case_id}_overview.png"
    return paths


def write_case(
    out_dir: str | Path,
    prediction: CasePrediction,
    regions: tuple[str, ...],
    *,
    figure: bool = True,
) -> dict:
    """Writes one case's NIfTI files (source affine and header) and, with `figure`, its
    overview figure."""
    from vi_seg_jax.plots import CaseVolumes, overview_figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = output_paths(out_dir, prediction.case.case_id, regions)
    header = read_nifti_header(prediction.reference).header
    affine = prediction.affine

    def squeeze(array):  # one region: a 3D map, several: [X, Y, Z, R]
        return array[..., 0] if array.shape[-1] == 1 else array

    task = get_task(prediction.task)
    labels = task.release_labels(prediction.labels, prediction.case.convention)
    write_nifti(paths["seg"], labels, affine=affine, header=header, kind="label")
    for r, region in enumerate(regions):
        write_nifti(
            paths[f"unc_{region}"],
            prediction.uncertainty[..., r],
            affine=affine,
            header=header,
            kind="label",
        )
    for role, array in (
        ("aleatoric", prediction.aleatoric),
        ("epistemic", prediction.epistemic),
        ("prob", prediction.probabilities),
        ("prob_uncalibrated", prediction.uncalibrated),
        ("tta", prediction.tta),
    ):
        if array is None:  # not written; nor left over from a run with other settings
            paths.pop(role).unlink(missing_ok=True)
        else:
            write_nifti(paths[role], squeeze(array), affine=affine, header=header, kind="float")
    if not figure:
        paths.pop("overview").unlink(missing_ok=True)
        return paths
    volumes = CaseVolumes(
        image=prediction.image[..., -1],
        truth=None if prediction.truth is None else prediction.truth > 0,
        prediction=prediction.labels > 0,
        aleatoric=prediction.aleatoric[..., 0],
        epistemic=prediction.epistemic[..., 0],
    )
    overview_figure(paths["overview"], volumes, title=f"{prediction.case.case_id}")
    return paths


def predict_folder(
    predictor: Predictor,
    out_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    split: str | None = None,
    skip_bad: bool = False,
    progress: bool = True,
    resume: bool = False,
    figures: bool = True,
) -> dict:
    """Predicts a case folder, a dataset or one of the run's splits into `out_dir`.

    Each case's files are written by `write_case` as soon as it is predicted, and
    `prediction.json` is rewritten after each case, so that an interrupted run leaves a
    folder that `evaluation.PredictionRun` reads. With several processes, process 0 writes.
    When the temperatures were fitted with other predictor settings than these (another TTA
    too: they are fitted without it), a note says so on stderr (they are applied all the
    same). `prediction.json` records `tta` beside the other settings.

    Args:
      predictor: the run (`load_trained`) with the samples, windows and devices to use.
      out_dir: the output folder (created).
      data_dir: one case folder or a dataset; None: the run's dataset (needs `split`).
      split: `"test"` or `"validation"`: only the run's cases of that split (its
        `splits.json`).
      skip_bad: warn about and skip invalid cases instead of raising.
      progress: progress bars over the cases and each case's samples.
      resume: keep the cases that `out_dir` already holds in full, made by the same
        checkpoint, input, task, samples, windows, TTA and temperatures (its
        `prediction.json` says so), and predict only the others; anything made otherwise is
        redone.
      figures: write each case's overview figure (about a second a case; studies that
        predict many sets skip it).

    Returns:
      The record written to `prediction.json` (`evaluation.prediction_record`).

    Raises:
      DataError: no case to predict, or an invalid case (without `skip_bad`).
      ValueError: neither `data_dir` nor `split` given.
    """
    model = predictor.model
    data_dir, cases = _cases_to_predict(model, data_dir, split, skip_bad)
    out_dir = Path(out_dir)
    primary = is_primary()
    calibrated_with = model.calibrated_with
    if calibrated_with and calibrated_with != predictor.settings() and primary:
        print(
            f"note: the temperatures were fitted with {calibrated_with}; this run uses "
            f"{predictor.settings()}, so they may calibrate it less well",
            file=sys.stderr,
        )
    if primary:
        out_dir.mkdir(parents=True, exist_ok=True)
    record = prediction_record(
        checkpoint=model.workdir,
        input_dir=data_dir,
        step=model.step,
        task=model.task,
        settings=predictor.settings(),
        devices=predictor.devices,
        temperature={r: model.temperatures.get(r, 1.0) for r in model.regions},
        cases=[],
    )
    finished = _finished_cases(out_dir, record, model) if resume else set()
    if finished and primary:
        print(f"continuing: {len(finished)} case(s) already predicted", file=sys.stderr)
    progress = progress and primary
    for case in tqdm(cases, desc="cases", unit="case", disable=None if progress else True):
        if case.case_id in finished:
            record["cases"].append(case.case_id)
            continue
        prediction = predictor.predict_case(case, progress=progress)
        record["cases"].append(case.case_id)
        if primary:
            write_case(out_dir, prediction, model.regions, figure=figures)
            write_json_atomic(out_dir / PREDICTION_FILE, record)
    return record


def _finished_cases(out_dir: Path, record: dict, model: TrainedModel) -> set[str]:
    """Cases of an earlier run into `out_dir` with the same settings and all their files."""
    try:
        earlier = json.loads((out_dir / PREDICTION_FILE).read_text())
    except (OSError, ValueError):
        return set()
    # The device count changes only the order of float sums, not what was predicted. A
    # record from before TTA existed has no `tta`: it predicted without.
    earlier.setdefault("tta", "none")
    same = all(earlier.get(k) == v for k, v in record.items() if k not in ("cases", "devices"))
    if not same:
        return set()
    calibrated = any(t != 1.0 for t in record["temperature"].values())

    def complete(case_id: str) -> bool:
        paths = output_paths(out_dir, case_id, model.regions)
        if not calibrated:
            del paths["prob_uncalibrated"]
        if record["tta"] == "none":
            del paths["tta"]
        del paths["overview"]  # a figure, not a result
        return all(path.is_file() for path in paths.values())

    return {case_id for case_id in earlier.get("cases", []) if complete(case_id)}


def _cases_to_predict(
    model: TrainedModel, data_dir: str | Path | None, split: str | None, skip_bad: bool
) -> tuple[Path, list[CaseFiles]]:
    """The folder predicted from and its cases: all, or those of the run's `split`."""
    if data_dir is None and split is None:
        raise ValueError("give data_dir, split, or both")
    wanted = None
    if split is not None:
        splits = read_splits(model.workdir)
        data_dir = data_dir or Path(splits["root"])
        wanted = set(splits[split])
    dataset = discover_cases(
        data_dir,
        modalities=model.config.data.modalities,
        require_labels=False,
        skip_bad=skip_bad,
    )
    cases = [c for c in dataset.cases if wanted is None or c.case_id in wanted]
    if not cases:
        raise DataError(Path(data_dir), f"holds none of the run's {split} cases")
    return Path(data_dir), cases
