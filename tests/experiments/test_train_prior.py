"""train_prior → train --prior dwp from the command line, on tiny shapes."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from experiments import train, train_prior
from vi_seg_jax.checkpoint import checkpoint_manager, restore_checkpoint
from vi_seg_jax.data.synthetic import write_dataset
from vi_seg_jax.dwp.vae_storage import load_vae
from vi_seg_jax.predict import load_trained
from vi_seg_jax.train.build import build_spec
from vi_seg_jax.train.config import TrainConfig
from vi_seg_jax.train.state import create_train_state

TINY = ["--features", "4", "8", "8", "16", "--patch", "16", "16", "16", "--no-progress"]


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    root = tmp_path_factory.mktemp("dwp")
    source = root / "lesions"
    write_dataset(source, num_cases=4, domain="lesions", shape=(32, 32, 24), seed=6)
    out = root / "prior"
    argv = ["--backbone", "unet", "--out", str(out), "--source-data-dir", str(source), *TINY]
    # Every group keeps its VAE (ten VAE steps lose to the Gaussian fit everywhere).
    argv += ["--sources", "2", "--source-steps", "2", "--vae-steps", "10", "--always-vae"]
    with jax.numpy_dtype_promotion("standard"):
        assert train_prior.main(argv) == 0
    return out


def test_prior_folder_holds_a_vae_per_group_and_the_kernels(prior):
    manifest = json.loads((prior / "manifest.json").read_text())
    assert manifest["backbone"] == "unet" and manifest["spatial_dims"] == 3
    assert list(manifest["groups"]) == [f"encoder_{i}" for i in (1, 2, 3, 4)] + [
        "up_1",
        "up_2",
        "up_3",
    ]
    sources = manifest["reports"]["sources"]
    assert len(sources) == 2
    source_params = [
        traverse_util.flatten_dict(load_trained(source).state.params, sep="/") for source in sources
    ]
    for group, paths in manifest["groups"].items():
        report = manifest["reports"][group]
        kernels = np.load(prior / "kernels" / f"{group}.npy")
        # The kernels are every k×k×k slice (one per input/output channel pair) of the group's
        # layers in both source networks, but those of L2 norm ≤ 1e-2 (in any order).
        slices = np.array(
            [
                params[path][..., i, o].ravel()
                for params in source_params
                for path in paths
                for i in range(params[path].shape[-2])
                for o in range(params[path].shape[-1])
            ]
        )
        slices = slices[np.linalg.norm(slices, axis=1) > 1e-2]
        np.testing.assert_array_equal(_sorted_rows(kernels), _sorted_rows(slices))
        _check_normal_baseline(report, kernels)
        assert np.isfinite(report["heldout_neg_elbo"])
        _, config = load_vae(prior / "vae" / group)
        assert config.latent_dim == 6 and config.spatial_dims == 3
    assert not list(prior.parent.glob(".prior.*"))  # nothing half-written


def _sorted_rows(rows):
    rows = np.asarray(rows, np.float32)
    return rows[np.lexsort(rows.T[::-1])]


def _check_normal_baseline(report, kernels):
    """The N(0, σ²) baseline agrees with the kernels whatever the (seeded) split was.

    train, validation and held-out kernels partition the group's kernels. σ² is the mean
    square of the training entries, so their sum of squares is S_t = n_t·D·σ²; the held-out
    −log N(w; 0, σ²I), averaged, is S_h/(2σ² n_h) + (D/2)·log 2πσ², which gives S_h. Each
    S, and S_v = Σ_all − S_t − S_h, lies between the sums of the n smallest and n largest
    squared norms.
    """
    counts = [int(report[k]) for k in ("train_kernels", "heldout_kernels", "validation_kernels")]
    assert sum(counts) == len(kernels) and min(counts[:2]) >= 1
    dim = kernels.shape[1]
    squares = np.sort(np.sum(np.asarray(kernels, np.float64) ** 2, axis=1))
    variance = report["normal_variance"]
    train = counts[0] * dim * variance
    quadratic = report["heldout_normal_neg_log_lik"] - 0.5 * dim * np.log(2 * np.pi * variance)
    heldout = 2 * variance * counts[1] * quadratic
    validation = squares.sum() - train - heldout
    rounding = 1e-6 * squares.sum()
    for total, n in zip((train, heldout, validation), counts, strict=True):
        smallest, largest = squares[:n].sum(), squares[len(squares) - n :].sum()
        assert smallest - rounding <= total <= largest + rounding


def _restored(workdir):
    """The prior and the latest train state of a run, restored in full."""
    config = TrainConfig.from_dict(json.loads((workdir / "config.json").read_text()))
    spec = build_spec(config, num_data=1.0)
    sample = jax.ShapeDtypeStruct((1, *config.data.patch_shape, 4), jax.numpy.float32)
    like = jax.eval_shape(lambda x: create_train_state(jax.random.key(0), spec, x), sample)
    state, _ = restore_checkpoint(checkpoint_manager(workdir / "checkpoints"), like)
    return spec.prior, state


def test_train_with_the_deep_weight_prior_and_its_encoders_end_to_end(prior, tmp_path, monkeypatch):
    monkeypatch.setenv("VI_SEG_JAX_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    write_dataset(data, num_cases=4, shape=(32, 32, 24), seed=1)
    argv = ["--data-dir", str(data), *TINY, "--batch-size", "2", "--no-tensorboard"]
    argv += ["--test-size", "1", "--validation-size", "1", "--train-size", "2"]
    argv += ["--steps-per-epoch", "1", "--validation-samples", "1", "--learning-rate", "1e-2"]
    argv += ["--prior", "dwp", "--prior-dir", str(prior), "--dwp-init", "--dwp-train-encoder"]
    workdir = tmp_path / "whole"
    with jax.numpy_dtype_promotion("standard"):
        assert train.main([*argv, "--workdir", str(workdir), "--steps", "3"]) == 0
        resumed = ["--workdir", str(tmp_path / "resumed")]
        assert train.main([*argv, *resumed, "--steps", "2"]) == 0
        assert train.main([*argv, *resumed, "--steps", "3", "--resume"]) == 0
    config = json.loads((workdir / "config.json").read_text())
    assert config["prior"]["kind"] == "dwp" and config["prior"]["init_from_prior"]
    assert config["prior"]["train_encoder"]
    assert config["method"]["guide"]["init_log_var"] == -10.0
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["kl"]) and np.isfinite(r["loss"]) for r in records if "kl" in r)

    dwp, state = _restored(workdir)
    initial = dwp.init_params()
    assert set(state.prior_params) == set(initial) == set(dwp.groups)
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), state.prior_params, initial)
    assert min(jax.tree.leaves(moved)) > 0  # every encoder layer was trained
    _, resumed_state = _restored(tmp_path / "resumed")
    for a, b in zip(
        jax.tree.leaves(state.prior_params),
        jax.tree.leaves(resumed_state.prior_params),
        strict=True,
    ):
        # Restored, not re-initialised (that would differ by Adam steps of about 1e-2);
        # the tolerance admits a GPU's non-deterministic reductions.
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

    # Prediction needs neither the encoders nor the prior folder.
    model = load_trained(workdir)
    assert model.state.prior_params is None
    for a, b in zip(jax.tree.leaves(model.state.guide), jax.tree.leaves(state.guide), strict=True):
        np.testing.assert_array_equal(a, b)


def _train_cli(tmp_path, *args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.train", "--workdir", str(tmp_path / "w"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={"VI_SEG_JAX_CACHE": str(tmp_path / "cache"), **_base_env()},
    )


def _base_env():
    import os

    return {k: v for k, v in os.environ.items() if k != "VI_SEG_JAX_CACHE"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--backbone", "vnet"], "prior built for backbone unet, this run uses vnet"),
        (["--spatial-dims", "2", "--patch", "16", "16"], "this run has 3^2"),
        (["--features", "4", "8", "16"], "layer grouping"),
    ],
)
def test_a_prior_for_another_network_is_a_one_line_error(prior, tmp_path, extra, message):
    data = tmp_path / "data"
    write_dataset(data, num_cases=3, shape=(32, 32, 24), seed=1)
    args = ["--data-dir", str(data), "--prior", "dwp", "--prior-dir", str(prior), "--steps", "1"]
    args += ["--test-size", "1", "--validation-size", "1", "--train-size", "1", "--no-progress"]
    result = _train_cli(tmp_path, *args, *TINY, *extra)  # the last --features/--patch wins
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "manifest.json" in lines[0]


def test_prior_flags_are_checked(tmp_path):
    result = _train_cli(tmp_path, "--prior", "dwp")
    assert result.returncode == 2 and "--prior-dir" in result.stderr
    result = _train_cli(tmp_path, "--prior", "dwp", "--prior-dir", "x", "--method", "ensemble")
    assert result.returncode == 2 and "--method vi" in result.stderr
    result = _train_cli(tmp_path, "--dwp-train-encoder")
    assert result.returncode == 2 and "--dwp-train-encoder needs --prior dwp" in result.stderr


def test_fine_tuning_from_a_source_run_keeps_frozen_layers(prior, tmp_path, monkeypatch):
    monkeypatch.setenv("VI_SEG_JAX_CACHE", str(tmp_path / "cache"))
    source = prior.with_name(f"{prior.name}.sources") / "seed0"
    data = tmp_path / "data"
    write_dataset(data, num_cases=4, shape=(32, 32, 24), seed=1)
    workdir = tmp_path / "run"
    argv = ["--data-dir", str(data), "--workdir", str(workdir), *TINY, "--batch-size", "2"]
    argv += ["--test-size", "1", "--validation-size", "1", "--train-size", "2", "--steps", "2"]
    argv += ["--steps-per-epoch", "2", "--no-tensorboard", "--method", "deterministic"]
    argv += ["--init-from", str(source), "--freeze", "down_3", "down_4"]
    with jax.numpy_dtype_promotion("standard"):
        assert train.main(argv) == 0
    before = load_trained(source).state.params
    after = load_trained(workdir).state.params
    for layer in ("down_3", "down_4"):
        for a, b in zip(jax.tree.leaves(before[layer]), jax.tree.leaves(after[layer]), strict=True):
            np.testing.assert_array_equal(a, b)
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), before, after))
    assert any(changed)  # the rest was fine-tuned
