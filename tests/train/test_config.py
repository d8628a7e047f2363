import dataclasses

import pytest

from vi_seg_jax.methods import MethodConfig
from vi_seg_jax.train.config import BackboneConfig, TrainConfig


def test_mc_dropout_without_dropout_is_rejected():
    with pytest.raises(ValueError, match=r"mc_dropout needs backbone\.dropout_rate > 0"):
        TrainConfig(method=MethodConfig(method="mc_dropout"))


def test_mc_dropout_with_dropout_round_trips():
    config = TrainConfig(
        method=MethodConfig(method="mc_dropout"), backbone=BackboneConfig(dropout_rate=0.1)
    )
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="dropout_rate"):
        dataclasses.replace(config, backbone=BackboneConfig(dropout_rate=0.0))
