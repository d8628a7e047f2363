import jax
import jax.numpy as jnp
import numpy as np

from tests.bayes.tiny import TinyNet, tiny_batch
from vi_seg_jax.bayes.guide import (
    GuideConfig,
    bayesian_paths,
    init_guide,
    merge_params,
    sample_kernels,
    split_params,
)


def _params():
    images, _ = tiny_batch()
    return TinyNet().init(jax.random.key(0), images)["params"]


def test_default_selection_is_every_3x3_kernel_and_nothing_else():
    params = _params()
    assert bayesian_paths(params) == (("conv_1", "kernel"), ("conv_2", "kernel"))
    kernels, rest = split_params(params, bayesian_paths(params))
    assert set(rest) == {"head"}
    merged = merge_params(rest, kernels)
    jax.tree_util.tree_map(np.testing.assert_array_equal, merged, dict(params))


def test_initialisation_follows_the_config():
    kernels, _ = split_params(_params(), bayesian_paths(_params()))
    guide = init_guide(
        jax.random.key(1), kernels, GuideConfig(init_loc_std=0.02, init_log_var=-10.0)
    )
    locs = np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(guide.loc)])
    assert abs(locs.std() - 0.02) < 0.01
    assert all(np.all(v == -10.0) for v in jax.tree_util.tree_leaves(guide.log_var))
    assert guide.num_weights == 3 * 3 * 1 * 3 + 3 * 3 * 3 * 3
    warm = init_guide(jax.random.key(1), kernels, GuideConfig(init_loc_std=None))
    jax.tree_util.tree_map(np.testing.assert_array_equal, warm.loc, kernels)


def test_samples_have_the_guide_moments():
    kernels, _ = split_params(_params(), bayesian_paths(_params()))
    guide = init_guide(jax.random.key(1), kernels, GuideConfig(init_loc_std=0.5, init_log_var=-2.0))
    draws = jax.vmap(lambda k: sample_kernels(k, guide))(jax.random.split(jax.random.key(2), 4000))
    for loc, draw in zip(
        jax.tree_util.tree_leaves(guide.loc), jax.tree_util.tree_leaves(draws), strict=True
    ):
        np.testing.assert_allclose(draw.mean(0), loc, atol=5 * np.exp(-1.0) / np.sqrt(4000))
        np.testing.assert_allclose(draw.std(0), np.exp(-1.0), rtol=0.1)
    assert jax.tree_util.tree_leaves(draws)[0].dtype == jnp.float32


def test_spread_report_reads_every_weight_of_the_posterior():
    from vi_seg_jax.bayes.guide import GuideParams, spread_report

    rng = np.random.default_rng(0)
    loc = {
        "a": {"kernel": rng.normal(size=(3, 3, 2, 4))},
        "b": {"kernel": rng.normal(size=(3, 3, 4, 4))},
    }
    log_var = {
        "a": {"kernel": rng.normal(-5, 2, size=(3, 3, 2, 4))},
        "b": {"kernel": rng.normal(1, 1, size=(3, 3, 4, 4))},
    }
    report = spread_report(GuideParams(loc=loc, log_var=log_var))
    every_log_var = np.concatenate([log_var["a"]["kernel"].ravel(), log_var["b"]["kernel"].ravel()])
    every_loc = np.concatenate([loc["a"]["kernel"].ravel(), loc["b"]["kernel"].ravel()])
    assert report["weights"] == 72 + 144
    assert report["log_var_median"] == np.median(every_log_var)
    assert report["log_var_p5"] < report["log_var_median"] < report["log_var_p95"]
    share = np.mean(np.sqrt(np.exp(every_log_var)) > np.abs(every_loc))
    assert report["sigma_above_abs_mu"] == share and 0 < share < 1
