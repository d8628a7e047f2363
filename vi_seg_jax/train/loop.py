"""`train_and_evaluate(config, workdir)`: the whole training job.

Data (discovered, validated, preprocessed into the cache, split with a fixed seed) →
patch sampler → jitted `train_step` → periodic Monte Carlo validation (Dice/IoU per
volume) → Orbax checkpoints (last K and best) → early stopping → summary files and figure.

Reproducibility and resume: the root key is split once into `init`, `train`, `eval` and
`data` keys. Batch s is `sampler.batch_at(data_key, s)`; step noise comes from the key in
the train state. So a run resumed from its last checkpoint replays exactly the batches and
noise of an uninterrupted run and reaches bitwise the same parameters (on the same machine
and software).

Devices: the batch is sharded over a mesh of `config.devices` devices (default: all that
divide the batch evenly), the state replicated (`vi_seg_jax.parallel`); the result does not
depend on the device count beyond the order of float reductions. In a multi-process run
every process runs this same function; each supplies its rows of every batch, and only
process 0 writes logs, summaries and figures (checkpoints go through Orbax's multi-host
saving).

Workdir contents: `config.json`, `splits.json`, `metrics.jsonl` (one JSON object per line,
each with `step`), `summary.json`, `validation.png`, `checkpoints/`, `calibration.json`
(per-region temperatures fitted on the validation cases for the best checkpoint, with
prediction's samples and windows, and the validation ECE before and after them) and
`tensorboard/` (event files, when TensorBoard is installed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from vi_seg_jax.bayes.elbo import num_data_for_patches
from vi_seg_jax.bayes.guide import bayesian_paths, split_params
from vi_seg_jax.calibration import CALIBRATION_FILE
from vi_seg_jax.checkpoint import checkpoint_manager, read_meta, restore_checkpoint, save_checkpoint
from vi_seg_jax.data.cache import PreparedCase, prepare_dataset
from vi_seg_jax.data.default import ensure_default_dataset
from vi_seg_jax.data.discovery import discover_cases
from vi_seg_jax.data.loading import check_geometry
from vi_seg_jax.data.sampler import PatchSampler
from vi_seg_jax.data.splits import make_splits
from vi_seg_jax.errors import DataError
from vi_seg_jax.io.folders import write_json_atomic
from vi_seg_jax.methods import Deterministic
from vi_seg_jax.metrics import dice, iou
from vi_seg_jax.parallel import data_mesh, global_batch, is_primary, process_rows, replicated
from vi_seg_jax.plots import CaseVolumes, uncertainty_figure
from vi_seg_jax.predict import Predictor, TrainedModel, fit_temperatures, load_trained
from vi_seg_jax.task import get_task
from vi_seg_jax.train.build import build_spec, preprocess_config_for
from vi_seg_jax.train.config import TrainConfig
from vi_seg_jax.train.metrics_log import MetricsLog, read_records
from vi_seg_jax.train.state import ModelSpec, TrainState, create_train_state
from vi_seg_jax.train.step import make_train_step
from vi_seg_jax.uncertainty import Predictive, posterior_predictive, sample_fn_for

LOG_EVERY_STEPS = 10
# Config fields that may change between a run and its resumption.
_RESUMABLE_CHANGES = {("schedule", "steps"), ("schedule", "patience_epochs"), ("devices",)}


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says what to do."""


@dataclasses.dataclass
class _Progress:
    best_val_dice: float = -1.0
    best_step: int = -1
    last_improvement_step: int = 0


def _init_from_run(state: TrainState, config: TrainConfig) -> TrainState:
    """Weights of a trained deterministic run (source pretraining), same architecture."""
    source = load_trained(config.optimizer.init_from)
    if not isinstance(source.spec.strategy, Deterministic):
        raise DataError(Path(config.optimizer.init_from), "--init-from needs a deterministic run")
    same = (source.config.backbone, source.config.likelihood.task) == (
        config.backbone,
        config.likelihood.task,
    )
    if not same:
        raise DataError(
            Path(config.optimizer.init_from),
            f"holds a {source.config.likelihood.task} {source.config.backbone}, this run "
            f"trains a {config.likelihood.task} {config.backbone}",
        )
    params = source.state.params
    if state.guide is None:
        return state.replace(params=params)
    kernels, rest = split_params(params, bayesian_paths(params))
    return state.replace(params=rest, guide=dataclasses.replace(state.guide, loc=kernels))


def _init_from_prior(state: TrainState, spec: ModelSpec, key: jax.Array) -> TrainState:
    from vi_seg_jax.dwp.prior import DeepWeightPrior, init_locations_from_prior

    if not isinstance(spec.prior, DeepWeightPrior):
        raise ValueError("`prior.init_from_prior` needs the deep weight prior")
    guide = init_locations_from_prior(jax.random.fold_in(key, 1), state.guide, spec.prior)
    return state.replace(guide=guide)


def load_data(config: TrainConfig, *, progress: bool = True):
    """Discovers, checks, splits and prepares the cases.

    Every case's files are checked (headers, shapes, affines) before the split sizes, so a
    broken file is what the user hears about first. Returns (dataset, splits, train cases,
    validation cases).
    """
    data_dir = config.data.data_dir or ensure_default_dataset(progress=progress)
    dataset = discover_cases(data_dir, modalities=config.data.modalities, require_labels=True)
    for case in dataset.cases:
        check_geometry(case, config.data.modalities)
    try:
        sizes = config.data.split_sizes(len(dataset))
    except ValueError as error:
        raise DataError(dataset.root, str(error)) from None
    splits = make_splits(
        [case.case_id for case in dataset.cases],
        config.data.split_seed,
        test_size=sizes.test,
        validation_size=sizes.validation,
        train_sizes=(sizes.train,),
        repeats=config.data.train_repeat + 1,
    )
    train_ids = splits.train[(sizes.train, config.data.train_repeat)]
    by_id = {case.case_id: case for case in dataset.cases}
    wanted = set(train_ids) | set(splits.validation)
    subset = dataclasses.replace(dataset, cases=tuple(by_id[c] for c in sorted(wanted)))
    prepared = {
        case.case_id: case
        for case in prepare_dataset(
            subset,
            modalities=config.data.modalities,
            config=preprocess_config_for(config),
            progress=progress,
        )
    }
    train = [prepared[c] for c in train_ids]
    validation = [prepared[c] for c in splits.validation]
    return dataset, splits, train, validation


def train_and_evaluate(
    config: TrainConfig,
    workdir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    tensorboard: bool = True,
) -> dict[str, Any]:
    """Trains, validates and checkpoints; returns the summary also written to `summary.json`.

    `tensorboard`: also write TensorBoard event files under `workdir/tensorboard` when
    TensorBoard is installed.
    """
    start_time = time.perf_counter()
    workdir = Path(workdir)
    checkpoints = workdir / "checkpoints"
    _check_workdir(workdir, config, resume)

    primary = is_primary()
    progress = progress and primary
    mesh = data_mesh(config.devices, batch_size=config.data.batch_size)
    shared = replicated(mesh)
    rows = process_rows(mesh, config.data.batch_size)
    dataset, splits, train_cases, validation_cases = load_data(config, progress=progress)
    manager = checkpoint_manager(checkpoints, keep_last=config.schedule.keep_checkpoints)
    if primary:
        _start_run_folder(workdir, config, dataset, splits)

    sampler = PatchSampler(
        [case.image for case in train_cases],
        [case.label for case in train_cases],
        patch_shape=config.data.patch_shape,
        batch_size=config.data.batch_size,
        foreground_fraction=config.data.foreground_fraction,
        unbiased_weights=config.data.unbiased_weights,
    )
    num_data = num_data_for_patches(
        [c.image.shape[:3] for c in train_cases], config.data.patch_shape
    )
    spec = build_spec(config, num_data)
    init_key, _, eval_key, data_key = jax.random.split(jax.random.key(config.seed), 4)
    sample_images = sampler.batch_at(data_key, 0, rows).images
    state = create_train_state(init_key, spec, sample_images, shared)
    if config.optimizer.init_from:
        state = jax.device_put(_init_from_run(state, config), shared)
    if config.prior.init_from_prior:
        state = jax.device_put(_init_from_prior(state, spec, init_key), shared)
    progress_state = _Progress()
    if resume and manager.latest_step() is not None:
        state, meta = restore_checkpoint(manager, state, sharding=shared)
        progress_state = _Progress(**meta["progress"])

    train_step = make_train_step(spec, mesh)
    validate, predict, samples = _validator(spec, config, validation_cases, eval_key, mesh)
    schedule = config.schedule
    validate_every = schedule.validate_every_epochs * schedule.steps_per_epoch
    patience = (
        None
        if schedule.patience_epochs is None
        else schedule.patience_epochs * schedule.steps_per_epoch
    )
    first_step = int(state.step)
    stopped_early = False
    bar = tqdm(
        total=schedule.steps,
        initial=first_step,
        desc="training",
        unit="step",
        disable=None if progress else True,
    )
    log = MetricsLog(workdir, first_step, tensorboard=tensorboard, enabled=primary)
    last_validation = None
    with bar, log:
        for step in range(first_step, schedule.steps):
            batch = sampler.batch_at(data_key, step, rows)
            local = (batch.images, batch.labels)
            if batch.weights is not None:
                local = (*local, batch.weights)
            arrays = global_batch(mesh, local, config.data.batch_size)
            state, metrics = train_step(state, arrays)
            done = step + 1
            if done % LOG_EVERY_STEPS == 0 or done == schedule.steps or done % validate_every == 0:
                values = {k: float(v) for k, v in metrics.items()}
                if not all(math.isfinite(v) for v in values.values()):
                    raise TrainingError(
                        f"loss became {values['loss']} at step {done}; the last good checkpoint "
                        f"(step {manager.latest_step()}) in {checkpoints} is intact — lower "
                        "--learning-rate or raise --kl-warmup-epochs"
                    )
                log.write({"step": done, **values})
                bar.set_postfix(
                    loss=f"{values['loss']:.3g}",
                    kl=f"{values['kl']:.3g}",
                    dice=f"{values['dice']:.3f}",
                )
            bar.update(1)
            if done % validate_every == 0 or done == schedule.steps:
                result = last_validation = validate(state)
                log.write({"step": done, **result})
                if result["val_dice"] > progress_state.best_val_dice:
                    progress_state = _Progress(result["val_dice"], done, done)
                meta = {
                    "config": config.to_dict(),
                    "progress": dataclasses.asdict(progress_state),
                    "sampler_position": done,
                }
                save_checkpoint(manager, state, meta, metrics={"val_dice": result["val_dice"]})
                bar.write(
                    f"step {done}: val_dice {result['val_dice']:.4f} val_iou {result['val_iou']:.4f}"
                )
                if patience is not None and done - progress_state.last_improvement_step >= patience:
                    stopped_early = True
                    bar.write(
                        f"early stopping: no validation improvement for {schedule.patience_epochs} epochs"
                    )
                    break

        if last_validation is None:  # resumed after the last step: read the run's log
            last_validation = [r for r in read_records(log.path) if "val_dice" in r][-1]
        final = last_validation
        summary = {
            "backbone": config.backbone.name,
            "method": config.method.method,
            "steps": int(state.step),
            "stopped_early": stopped_early,
            "final_val_dice": final["val_dice"],
            "final_val_iou": final["val_iou"],
            "best_val_dice": progress_state.best_val_dice,
            "best_step": progress_state.best_step,
            "wall_seconds": time.perf_counter() - start_time,
            "num_train_cases": len(train_cases),
            "num_validation_cases": len(validation_cases),
        }
        best_state = state
        if 0 < progress_state.best_step != int(state.step):
            best_state, _ = restore_checkpoint(
                manager, state, progress_state.best_step, sharding=shared
            )
        # Fitted with prediction's own settings, so they calibrate what `predict` writes.
        model = TrainedModel(workdir, config, spec, best_state, int(best_state.step), {})
        calibration = fit_temperatures(Predictor(model, mesh=mesh), validation_cases)
        summary["temperature"] = calibration["temperature"]
        for name in ("ece_before", "ece_after_in_sample", "ece_after_held_out"):
            summary[f"val_{name}"] = calibration[name]
        figure_maps = predict(state, 0)  # every process takes part in the computation
        if primary:
            write_json_atomic(
                workdir / CALIBRATION_FILE, {"step": int(best_state.step), **calibration}
            )
            write_json_atomic(workdir / "summary.json", summary)
            figure = workdir / "validation.png"
            _figure(figure, figure_maps, validation_cases[0], config, samples)
            log.image(int(state.step), "validation", figure)
    return summary


def _check_workdir(workdir: Path, config: TrainConfig, resume: bool) -> None:
    """Refuses to overwrite checkpoints without `resume`, or to resume another run."""
    checkpoints = workdir / "checkpoints"
    if not checkpoints.is_dir():  # the manager creates its folder: none before the data is read
        return
    manager = checkpoint_manager(checkpoints, keep_last=config.schedule.keep_checkpoints)
    if manager.latest_step() is not None and not resume:
        raise DataError(
            workdir,
            "already holds checkpoints; pass --resume to continue or choose another --workdir",
        )
    if resume and manager.latest_step() is not None:
        _check_same_run(read_meta(manager)["config"], config, checkpoints)


def _start_run_folder(workdir: Path, config: TrainConfig, dataset, splits) -> None:
    """Says how the cases are split and writes config.json and splits.json."""
    train_size = len(next(iter(splits.train.values())))
    print(
        f"{len(dataset)} cases: {len(splits.test)} test, {len(splits.validation)} validation, "
        f"{train_size} training"
    )
    workdir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(workdir / "config.json", config.to_dict())
    write_json_atomic(
        workdir / "splits.json",
        {"layout": dataset.layout.name, "root": str(dataset.root), **splits.to_dict()},
    )


def _check_same_run(saved: dict, config: TrainConfig, checkpoints: Path) -> None:
    current = config.to_dict()
    saved = TrainConfig.from_dict(saved).to_dict()  # fields added since take their defaults
    for section, values in current.items():
        if isinstance(values, dict):
            for name, value in values.items():
                old = saved.get(section, {}).get(name)
                if (section, name) not in _RESUMABLE_CHANGES and _jsonable(old) != _jsonable(value):
                    raise DataError(
                        checkpoints,
                        f"checkpoint was written with {section}.{name}={old!r}, this run has {value!r}; "
                        "use the same settings to resume or another --workdir",
                    )
        elif (section,) not in _RESUMABLE_CHANGES and _jsonable(saved.get(section)) != _jsonable(
            values
        ):
            raise DataError(
                checkpoints,
                f"checkpoint was written with {section}={saved.get(section)!r}, this run has {values!r}; "
                "use the same settings to resume or another --workdir",
            )


def _jsonable(value):
    return json.loads(json.dumps(value))


def _volume_batch(image: np.ndarray, spatial_dims: int) -> np.ndarray:
    """[X, Y, Z, C] -> [1, X, Y, Z, C] (3D) or [Z, X, Y, C] axial slices (2D)."""
    return image[None] if spatial_dims == 3 else np.moveaxis(image, 2, 0)


def _from_batch(array: jax.Array, spatial_dims: int) -> np.ndarray:
    """Inverse of `_volume_batch` for per-voxel outputs [..., K]."""
    array = np.asarray(array)
    return array[0] if spatial_dims == 3 else np.moveaxis(array, 0, 2)


def _validator(
    spec: ModelSpec,
    config: TrainConfig,
    cases: list[PreparedCase],
    eval_key: jax.Array,
    mesh=None,
):
    """A function state -> {val_dice, val_iou} (means over validation volumes).

    The Monte Carlo samples are spread over `mesh`'s devices.
    """
    dims = config.backbone.spatial_dims
    # Pad every validation volume to one shape so the predictive compiles once.
    shape = tuple(np.max([c.image.shape[:3] for c in cases], axis=0))
    samples = spec.strategy.default_samples(config.schedule.validation_samples)

    @jax.jit
    def predict_batch(state: TrainState, images: jax.Array, key: jax.Array) -> Predictive:
        return posterior_predictive(
            sample_fn_for(spec, state),
            images,
            key,
            num_samples=samples,
            task=spec.objective.likelihood.task,
            mesh=mesh,
        )

    def predict(state: TrainState, index: int) -> Predictive:
        """Predictive maps of validation case `index` on its preprocessed grid [X, Y, Z, ...]."""
        case = cases[index]
        image = _pad_to(np.asarray(case.image), shape)
        out = predict_batch(state, _volume_batch(image, dims), jax.random.fold_in(eval_key, index))
        extent = tuple(slice(0, s) for s in case.image.shape[:3])
        return Predictive(*(_from_batch(field, dims)[extent] for field in out))

    task = get_task(config.likelihood.task)

    def validate(state: TrainState) -> dict[str, float]:
        dices, ious = [], []
        for index, case in enumerate(cases):
            predicted = task.whole_tumour(predict(state, index).mean) > 0.5
            truth = np.asarray(case.label) > 0
            dices.append(dice(predicted, truth))
            ious.append(iou(predicted, truth))
        return {"val_dice": float(np.mean(dices)), "val_iou": float(np.mean(ious))}

    return validate, predict, samples


def _pad_to(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    pad = [(0, s - n) for s, n in zip(shape, image.shape[:3], strict=True)] + [(0, 0)]
    return np.pad(image, pad)


def _figure(path: Path, out: Predictive, case: PreparedCase, config: TrainConfig, samples: int):
    task = get_task(config.likelihood.task)
    volumes = CaseVolumes(
        image=np.asarray(case.image)[..., -1],
        truth=np.asarray(case.label) > 0,
        prediction=task.whole_tumour(out.mean) > 0.5,
        aleatoric=task.whole_tumour(out.aleatoric),
        epistemic=task.whole_tumour(out.epistemic),
    )
    uncertainty_figure(
        path,
        volumes,
        title=f"{case.case_id}: {config.backbone.name}, {config.method.method}, {samples} samples",
    )
