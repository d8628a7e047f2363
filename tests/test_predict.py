"""The predictor: sample chunks, test-time flips, the QU-BraTS uncertainty scale, restore
errors."""

import dataclasses
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vi_seg_jax.errors import DataError
from vi_seg_jax.methods import MethodConfig
from vi_seg_jax.predict import Predictor, TrainedModel, load_trained, qubrats_uncertainty
from vi_seg_jax.train.build import build_spec
from vi_seg_jax.train.config import BackboneConfig, DataConfig, TrainConfig
from vi_seg_jax.train.state import create_train_state
from vi_seg_jax.uncertainty import TTAPredictive


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


# --------------------------------------------------------------------- test-time flips


class _Pointwise(nn.Module):
    """A 1×1×1 network: it commutes with every flip of the volume."""

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        hidden = nn.tanh(nn.Conv(4, (1, 1, 1), name="conv")(x))
        return nn.Conv(2, (1, 1, 1), name="head")(hidden), {}


@pytest.fixture(scope="module")
def pointwise_model(model):
    """An ensemble of three pointwise networks: samples that differ, each equivariant."""
    method = MethodConfig(method="ensemble", ensemble_size=3)
    spec = dataclasses.replace(model.spec, backbone=_Pointwise(), method=method)
    state = create_train_state(jax.random.key(3), spec, jnp.zeros((1, 8, 8, 8, 4)))
    return dataclasses.replace(model, spec=spec, state=state)


# One bucket (32³) with symmetric tiles (origins 0, 8, 16 of 16³ windows): a flipped volume
# is tiled as the mirror image of the volume, so one flip alone is the plain predictor on
# the flipped volume.
_VOLUME = np.asarray(jax.random.normal(jax.random.key(1), (32, 32, 32, 4)))


def test_flips_split_the_variance_three_ways_as_the_flipped_volumes_say(model):
    key = jax.random.key(2)
    predictor = Predictor(model, num_samples=2, window_size=16, tta="flips")
    assert predictor.num_flips == 8 and predictor.settings()["tta"] == "flips"
    out = predictor.predictive(_VOLUME, key)
    assert isinstance(out, TTAPredictive) and out.tta.shape == (32, 32, 32, 2)

    # Brute force: the plain predictor on each mirrored volume, mirrored back, in float64.
    plain = Predictor(model, num_samples=2, window_size=16)
    flips = [plain.predictive(np.flip(_VOLUME, axes), key) for axes in predictor.flips]
    per_flip = {
        name: np.stack(
            [
                np.flip(getattr(f, name), axes)
                for f, axes in zip(flips, predictor.flips, strict=True)
            ]
        )
        for name in ("mean", "aleatoric", "epistemic")
    }
    per_flip = {name: value.astype(np.float64) for name, value in per_flip.items()}
    mean = per_flip["mean"].mean(0)
    np.testing.assert_allclose(out.mean, mean, atol=1e-6)
    np.testing.assert_allclose(out.aleatoric, per_flip["aleatoric"].mean(0), atol=1e-6)
    np.testing.assert_allclose(out.epistemic, per_flip["epistemic"].mean(0), atol=1e-6)
    tta = np.mean((per_flip["mean"] - mean) ** 2, axis=0)
    np.testing.assert_allclose(out.tta, tta, rtol=1e-3, atol=1e-9)
    # A convolution with learned 3³ kernels is no mirror image of itself: the flips differ.
    assert float(np.max(tta)) > 1e-4 and float(np.max(out.epistemic)) > 1e-5
    total = np.asarray(out.aleatoric + out.epistemic + out.tta, np.float64)
    np.testing.assert_allclose(total, out.mean * (1.0 - out.mean), atol=1e-6)


def test_flips_of_a_flip_equivariant_network_change_nothing(pointwise_model):
    key = jax.random.key(4)
    volume = _VOLUME[:20, :12, :9]  # bucket padding at the far end: flipped, at the near end
    plain = Predictor(pointwise_model, num_samples=3, window_size=16).predictive(volume, key)
    flipped = Predictor(pointwise_model, num_samples=3, window_size=16, tta="flips")
    out = flipped.predictive(volume, key)
    np.testing.assert_allclose(out.tta, 0.0, atol=1e-12)
    for name in ("mean", "aleatoric", "epistemic", "entropy", "mutual_information"):
        np.testing.assert_allclose(getattr(out, name), getattr(plain, name), atol=1e-6)
    assert float(np.max(plain.epistemic)) > 1e-4  # samples differ: only the flips agree


def test_one_network_with_flips_has_no_epistemic_part(model):
    out = Predictor(model, num_samples=1, window_size=16, tta="flips").predictive(
        _VOLUME[:16, :16, :16], jax.random.key(5)
    )
    np.testing.assert_array_equal(out.epistemic, 0.0)
    assert float(np.max(out.tta)) > 1e-4  # the flips carry the spread
    total = np.asarray(out.aleatoric + out.tta, np.float64)
    np.testing.assert_allclose(total, out.mean * (1.0 - out.mean), atol=1e-6)


def test_tta_settings(model):
    assert "tta" not in Predictor(model).settings()  # as calibration.json has always had them
    with pytest.raises(ValueError, match="tta must be one of"):
        Predictor(model, tta="rotations")
    config = dataclasses.replace(
        model.config,
        backbone=dataclasses.replace(model.config.backbone, spatial_dims=2),
        data=dataclasses.replace(model.config.data, patch_shape=(8, 8)),
    )
    spatial_2d = dataclasses.replace(model, config=config)
    assert Predictor(spatial_2d, tta="flips").flips == ((), (0,), (1,), (0, 1))
