import dataclasses
import re

import pytest

from vi_seg_jax.methods import MethodConfig
from vi_seg_jax.train.config import (
    DWP_INIT_LOG_VAR,
    EMBEDDED_SPLIT_SIZES,
    BackboneConfig,
    ConfigError,
    DataConfig,
    OptimizerConfig,
    PriorConfig,
    ScheduleConfig,
    SplitSizes,
    TrainConfig,
)


def test_mc_dropout_without_dropout_is_rejected():
    with pytest.raises(ValueError, match=r"mc_dropout needs `backbone\.dropout_rate` > 0"):
        TrainConfig(method=MethodConfig(method="mc_dropout"))


def test_mc_dropout_with_dropout_round_trips():
    config = TrainConfig(
        method=MethodConfig(method="mc_dropout"), backbone=BackboneConfig(dropout_rate=0.1)
    )
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="dropout_rate"):
        dataclasses.replace(config, backbone=BackboneConfig(dropout_rate=0.0))


def test_mc_dropout_gets_its_default_dropout_when_switched_to():
    config = TrainConfig().with_method("mc_dropout")
    assert config.backbone.dropout_rate == 0.1 and config.method.method == "mc_dropout"
    assert TrainConfig().with_method("vi").backbone.dropout_rate == 0.0


def test_the_deep_weight_prior_starts_the_posterior_at_its_codes_log_variance():
    config = TrainConfig().with_deep_weight_prior("/priors/p", train_encoder=True)
    assert config.prior == PriorConfig(kind="dwp", directory="/priors/p", train_encoder=True)
    assert config.method.guide.init_log_var == DWP_INIT_LOG_VAR == -10.0


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: DataConfig(batch_size=0), "`data.batch_size`"),
        (lambda: DataConfig(validation_size=0), "`data.validation_size`"),
        (lambda: DataConfig(test_size=-1), "`data.test_size`"),
        (lambda: DataConfig(patch_shape=(16,)), "`data.patch_shape`"),
        (lambda: DataConfig(foreground_fraction=1.5), "`data.foreground_fraction`"),
        (lambda: ScheduleConfig(steps=0), "`schedule.steps`"),
        (lambda: ScheduleConfig(patience_epochs=0), "`schedule.patience_epochs`"),
        (lambda: PriorConfig(kind="dwp"), "`prior.directory`"),
        (lambda: PriorConfig(directory="/p"), "`prior.directory`"),
        (lambda: PriorConfig(init_from_prior=True), "`prior.init_from_prior`"),
        (lambda: PriorConfig(train_encoder=True), "`prior.train_encoder`"),
        (lambda: PriorConfig(kl_weight=-1.0), "`prior.kl_weight`"),
        (lambda: OptimizerConfig(learning_rate=0.0), "`optimizer.learning_rate`"),
        (lambda: TrainConfig(data=DataConfig(patch_shape=(16, 16))), "`data.patch_shape`"),
        (
            lambda: TrainConfig(
                prior=PriorConfig(kind="dwp", directory="/p"),
                method=MethodConfig(method="deterministic"),
            ),
            "`method.method`",
        ),
    ],
)
def test_each_section_checks_its_own_fields_and_names_them(make, field):
    with pytest.raises(ConfigError, match=re.escape(field)) as error:
        make()
    assert "\n" not in str(error.value)


def test_a_config_json_of_the_flat_layout_loads_into_the_sections():
    config = TrainConfig(
        prior=PriorConfig(kind="dwp", directory="/p", init_from_prior=True, kl_weight=0.5),
        optimizer=OptimizerConfig(learning_rate=3e-3, frozen_layers=("down_3",), init_from="/r"),
    )
    flat = config.to_dict()
    prior, optimizer = flat.pop("prior"), flat.pop("optimizer")
    flat.update(
        prior=prior["kind"],
        prior_dir=prior["directory"],
        dwp_init=prior["init_from_prior"],
        dwp_train_encoder=prior["train_encoder"],
        kl_weight=prior["kl_weight"],
        kl_warmup_epochs=prior["kl_warmup_epochs"],
        learning_rate=optimizer["learning_rate"],
        clip_norm=optimizer["clip_norm"],
        frozen_layers=list(optimizer["frozen_layers"]),
        init_from=optimizer["init_from"],
    )
    assert TrainConfig.from_dict(flat) == config
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown config field TrainConfig\.bogus"):
        TrainConfig.from_dict({**config.to_dict(), "bogus": 1})


@pytest.mark.parametrize(
    "cases,sizes",
    [(3, (1, 1, 1)), (2, (0, 1, 1)), (10, (2, 1, 7)), (1251, (250, 125, 876))],
)
def test_a_users_dataset_trains_on_every_case_not_held_out(cases, sizes):
    got = DataConfig(data_dir="/data").split_sizes(cases)
    assert (got.test, got.validation, got.train) == sizes
    assert got.test + got.validation + got.train == cases


def test_given_sizes_and_the_embedded_protocol_are_kept():
    assert DataConfig().split_sizes(50) == SplitSizes(*EMBEDDED_SPLIT_SIZES)
    assert EMBEDDED_SPLIT_SIZES == (10, 5, 20)
    given = DataConfig(data_dir="/d", test_size=0, validation_size=2, train_size=5)
    assert given.split_sizes(40) == SplitSizes(0, 2, 5)
    assert DataConfig(data_dir="/d", test_size=0).split_sizes(40) == SplitSizes(0, 4, 36)


@pytest.mark.parametrize(
    "data,cases",
    [
        (DataConfig(data_dir="/d"), 1),
        (DataConfig(data_dir="/d", test_size=5), 4),
        (DataConfig(), 30),
    ],
)
def test_sizes_the_data_cannot_give_are_refused(data, cases):
    with pytest.raises(ConfigError, match=f"{cases} cases cannot give"):
        data.split_sizes(cases)
