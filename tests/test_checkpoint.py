"""Checkpoints restore what the reader needs, and refuse when something it needs is missing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vi_seg_jax.backbones import get_backbone
from vi_seg_jax.checkpoint import checkpoint_manager, restore_checkpoint, save_checkpoint
from vi_seg_jax.errors import DataError
from vi_seg_jax.train.state import ModelSpec, create_train_state


@pytest.fixture
def state():
    net = get_backbone("unet", num_classes=2, spatial_dims=2, features=(4, 8))
    return create_train_state(jax.random.key(0), ModelSpec(net), jnp.zeros((1, 8, 8, 4)))


def test_a_reader_without_the_priors_parameters_restores_the_rest(state, tmp_path):
    trained_prior = {"encoder_1": {"enc_out": jnp.arange(3.0)}}
    manager = checkpoint_manager(tmp_path / "checkpoints")
    save_checkpoint(manager, state.replace(prior_params=trained_prior), {"note": "with prior"})

    restored, meta = restore_checkpoint(manager, state)  # prediction's reader: no prior
    assert meta == {"note": "with prior"} and restored.prior_params is None
    for a, b in zip(jax.tree.leaves(restored.guide), jax.tree.leaves(state.guide), strict=True):
        np.testing.assert_array_equal(a, b)

    full, _ = restore_checkpoint(manager, state.replace(prior_params=trained_prior))
    np.testing.assert_array_equal(full.prior_params["encoder_1"]["enc_out"], [0.0, 1.0, 2.0])


def test_a_reader_needing_what_the_checkpoint_lacks_is_refused(state, tmp_path):
    manager = checkpoint_manager(tmp_path / "checkpoints")
    save_checkpoint(manager, state, {})  # no prior parameters (or written before they existed)
    needs_prior = state.replace(prior_params={"encoder_1": {"enc_out": jnp.zeros(3)}})
    with pytest.raises(
        DataError, match=r"checkpoints/0: does not hold this run.s state .*prior_params"
    ):
        restore_checkpoint(manager, needs_prior)
    # A layer the checkpoint lacks (another architecture) is named.
    params = {**state.params, "extra_layer": {"bias": jnp.zeros(2)}}
    with pytest.raises(
        DataError, match=r"checkpoints/0: holds no \.params\['extra_layer'\]\['bias'\]"
    ):
        restore_checkpoint(manager, state.replace(params=params))
