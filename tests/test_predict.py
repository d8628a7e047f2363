"""The predictor: sample chunks, the QU-BraTS uncertainty scale, restore errors."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vi_seg_jax.errors import DataError
from vi_seg_jax.predict import Predictor, TrainedModel, load_trained, qubrats_uncertainty
from vi_seg_jax.train.build import build_spec
from vi_seg_jax.train.config import BackboneConfig, DataConfig, TrainConfig
from vi_seg_jax.train.state import create_train_state


@pytest.fixture(scope="module")
def model():
    config = TrainConfig(
        backbone=BackboneConfig(features=(4, 8)), data=DataConfig(patch_shape=(8, 8, 8))
    )
    spec = build_spec(config, num_data=1.0)
    state = create_train_state(jax.random.key(0), spec, jnp.zeros((1, 8, 8, 8, 4)))
    # A wide posterior, so that samples differ.
    guide = dataclasses.replace(
        state.guide, log_var=jax.tree.map(lambda v: v + 4.0, state.guide.log_var)
    )
    return TrainedModel(Path("."), config, spec, state.replace(guide=guide), 0, {})


def test_sample_chunks_give_the_same_predictive_as_one_sample_at_a_time(model):
    volume = np.asarray(jax.random.normal(jax.random.key(1), (20, 12, 9, 4)))
    key = jax.random.key(2)
    one = Predictor(model, num_samples=5, window_size=16, chunk_size=1).predictive(volume, key)
    chunked = Predictor(model, num_samples=5, window_size=16, chunk_size=3).predictive(volume, key)
    assert one.mean.shape == (20, 12, 9, 2)
    for a, b in zip(one, chunked, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert float(np.max(one.epistemic)) > 1e-5


def test_qubrats_uncertainty_is_binary_entropy_in_percent():
    p = np.array([0.0, 1.0, 0.5, 0.11002786443835955, 0.9])
    np.testing.assert_array_equal(qubrats_uncertainty(p), [0, 0, 100, 50, 47])
    assert qubrats_uncertainty(p).dtype == np.uint8


def test_restore_errors_name_the_folder(tmp_path):
    with pytest.raises(DataError, match=r"no config\.json"):
        load_trained(tmp_path)
    (tmp_path / "config.json").write_text(TrainConfig().to_json())
    with pytest.raises(DataError, match="no checkpoints"):
        load_trained(tmp_path)
