"""Kernel VAE folders: the save/load round trip and a DataError for every malformed folder."""

import json
import shutil

import jax
import numpy as np
import pytest

from vi_seg_jax.dwp import vae, vae_storage
from vi_seg_jax.errors import DataError

SMALL_CONFIG = vae.VAEConfig(spatial_dims=2, latent_dim=2, hidden=8)


def _assert_same_vae(a, b, config):
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    w = np.random.default_rng(0).normal(size=(4, config.kernel_dim)).astype(np.float32)
    for x, y in zip(vae.encode(a, config, w), vae.encode(b, config, w), strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(
        vae.sample_kernels(a, config, jax.random.key(0), 4),
        vae.sample_kernels(b, config, jax.random.key(0), 4),
    )


def test_save_load_round_trip_and_overwrite(tmp_path):
    target = tmp_path / "vae"
    params = vae.init_vae(jax.random.key(0), SMALL_CONFIG)
    vae_storage.save_vae(target, params, SMALL_CONFIG)
    loaded, config = vae_storage.load_vae(target)
    assert config == SMALL_CONFIG
    _assert_same_vae(params, loaded, config)

    # Saving over an existing VAE replaces it whole and leaves no temporary directories.
    other = vae.init_vae(jax.random.key(1), SMALL_CONFIG)
    vae_storage.save_vae(target, other, SMALL_CONFIG)
    _assert_same_vae(other, vae_storage.load_vae(target)[0], SMALL_CONFIG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]
    assert not list(target.rglob("*.pkl")) and not list(target.rglob("*.pickle"))


def _no_config(d):
    (d / "config.json").unlink()


def _bad_json(d):
    (d / "config.json").write_text("{not json")


def _wrong_format(d):
    (d / "config.json").write_text(json.dumps({"format": "something else"}))


def _edit_config(**changes):
    def edit(d):
        document = json.loads((d / "config.json").read_text())
        document["config"].update(changes)
        (d / "config.json").write_text(json.dumps(document))

    return edit


def _no_params(d):
    shutil.rmtree(d / "params")


def _params_metadata_removed(d):
    (d / "params" / "_METADATA").unlink()


@pytest.mark.parametrize(
    ("corrupt", "path_suffix", "problem"),
    [
        (_no_config, "config.json", "config missing"),
        (_bad_json, "config.json", "unreadable"),
        (_wrong_format, "config.json", "not a kernel VAE"),
        (_edit_config(unknown_field=1), "config.json", "unknown_field"),
        (_edit_config(spatial_dims=4), "config.json", "spatial_dims"),
        (_no_params, "params", "parameters missing"),
        (_edit_config(latent_dim=3), "params", "do not match"),
        (_params_metadata_removed, "params", "unreadable"),
    ],
)
def test_load_malformed_raises_data_error(tmp_path, corrupt, path_suffix, problem):
    target = tmp_path / "vae"
    vae_storage.save_vae(target, vae.init_vae(jax.random.key(0), SMALL_CONFIG), SMALL_CONFIG)
    corrupt(target)
    with pytest.raises(DataError, match=problem) as info:
        vae_storage.load_vae(target)
    assert info.value.path == str(target / path_suffix)
    assert "\n" not in str(info.value)


def test_load_missing_directory_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="no kernel VAE") as info:
        vae_storage.load_vae(tmp_path / "absent")
    assert info.value.path == str(tmp_path / "absent")
