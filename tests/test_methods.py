"""The method registry: every method resolves once, and a new one plugs in by the recipe in
docs/architecture.md (a subclass of `Method` and an entry in `METHODS`)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.bayes.tiny import TinyNet, tiny_batch
from vi_seg_jax import methods
from vi_seg_jax.bayes.layers import apply_backbone
from vi_seg_jax.methods import METHODS, Method, MethodConfig, resolve_method
from vi_seg_jax.train.config import BackboneConfig, TrainConfig
from vi_seg_jax.train.state import ModelSpec, create_train_state
from vi_seg_jax.train.step import make_train_step
from vi_seg_jax.uncertainty import posterior_predictive, sample_fn_for


def test_every_registered_method_resolves_to_its_class():
    for name, cls in METHODS.items():
        method = resolve_method(MethodConfig(method=name))
        assert type(method) is cls and method.config.method == name
    with pytest.raises(ValueError, match="method must be one of"):
        MethodConfig(method="laplace")


def test_default_samples_follow_the_method():
    asked = 7
    assert resolve_method(MethodConfig(method="vi")).default_samples(asked) == asked
    assert resolve_method(MethodConfig(method="mc_dropout")).default_samples(asked) == asked
    assert resolve_method(MethodConfig(method="deterministic")).default_samples(asked) == 1
    ensemble = MethodConfig(method="ensemble", ensemble_size=3)
    assert resolve_method(ensemble).default_samples(asked) == 3


def test_config_rules_come_from_the_method():
    with pytest.raises(ValueError, match="dropout_rate` > 0"):
        TrainConfig(method=MethodConfig(method="mc_dropout"))
    TrainConfig(method=MethodConfig(method="mc_dropout"), backbone=BackboneConfig(dropout_rate=0.1))


class InputNoise(Method):
    """The recipe's example: a MAP network whose posterior samples see noisy inputs."""

    noise: float = 0.5

    def default_samples(self, requested: int) -> int:
        return 3

    def sample_logits(self, backbone, params, guide, index, key, images):
        noisy = images + self.noise * jax.random.normal(key, images.shape)
        return apply_backbone(backbone, params, noisy, train=False)[0]


def test_a_new_method_plugs_in_by_subclass_and_registry_entry(monkeypatch):
    monkeypatch.setitem(METHODS, "input_noise", InputNoise)
    config = MethodConfig(method="input_noise")
    spec = ModelSpec(TinyNet(), config)
    images, labels = tiny_batch()
    state = create_train_state(jax.random.key(0), spec, images)
    assert state.guide is None  # trained like the MAP network
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam raises a float to an int
        state, metrics = make_train_step(spec)(state, (images, labels))
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1
    assert spec.strategy.default_samples(20) == 3
    out = posterior_predictive(sample_fn_for(spec, state), images, jax.random.key(1), num_samples=3)
    # Its samples differ (input noise), so it has epistemic uncertainty; the plain network
    # has none.
    assert float(jnp.max(out.epistemic)) > 1e-6
    deterministic = dataclasses.replace(spec, method=MethodConfig(method="deterministic"))
    plain = posterior_predictive(
        sample_fn_for(deterministic, state), images, jax.random.key(1), num_samples=3
    )
    assert float(jnp.max(plain.epistemic)) < 1e-10
    assert methods.METHODS["input_noise"] is InputNoise
