"""The training loop's stopping rules, in-process on tiny synthetic data."""

import json

import jax.numpy as jnp
import pytest

from vi_seg_jax.checkpoint import checkpoint_manager
from vi_seg_jax.data.synthetic import write_dataset
from vi_seg_jax.train import loop
from vi_seg_jax.train.config import BackboneConfig, DataConfig, ScheduleConfig, TrainConfig


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "data"
    write_dataset(root, num_cases=4, shape=(32, 32, 24), seed=2)
    return root


def _config(data_dir, **schedule):
    return TrainConfig(
        backbone=BackboneConfig(features=(4, 8, 8, 16)),
        data=DataConfig(
            data_dir=str(data_dir),
            test_size=1,
            validation_size=1,
            train_size=2,
            patch_shape=(16, 16, 16),
        ),
        schedule=ScheduleConfig(
            **{
                "steps": 12,
                "steps_per_epoch": 2,
                "validate_every_epochs": 1,
                "validation_samples": 1,
                **schedule,
            }
        ),
    )


def test_early_stopping_after_patience_without_improvement(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("VI_SEG_JAX_CACHE", str(tmp_path / "cache"))
    real = loop._validator

    def flat_validation(*args):
        _, predict, samples = real(*args)
        return (lambda state: {"val_dice": 0.5, "val_iou": 0.33}), predict, samples

    monkeypatch.setattr(loop, "_validator", flat_validation)
    summary = loop.train_and_evaluate(
        _config(data_dir, patience_epochs=2), tmp_path / "run", progress=False
    )
    # Best at step 2 (first validation); no improvement for 2 epochs (4 steps) -> stop at 6.
    assert summary["stopped_early"] and summary["steps"] == 6
    assert summary["best_step"] == 2


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(
    tmp_path, data_dir, monkeypatch
):
    monkeypatch.setenv("VI_SEG_JAX_CACHE", str(tmp_path / "cache"))
    real = loop.make_train_step

    def poisoned(spec, mesh=None):
        step = real(spec, mesh)

        def run(state, batch):
            state, metrics = step(state, batch)
            if int(state.step) >= 7:
                metrics = {**metrics, "loss": jnp.asarray(jnp.nan)}
            return state, metrics

        return run

    monkeypatch.setattr(loop, "make_train_step", poisoned)
    with pytest.raises(
        loop.TrainingError,
        match=r"loss became nan at step \d+; the last good checkpoint \(step 6\)",
    ):
        loop.train_and_evaluate(_config(data_dir), tmp_path / "run", progress=False)
    assert checkpoint_manager(tmp_path / "run" / "checkpoints").latest_step() == 6
    logged = [
        json.loads(line)["step"]
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert max(logged) <= 6
