"""The training CLI end to end, on tiny synthetic data (seconds per run, not minutes)."""

import json
import os
import signal
import stat
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.experiments.test_reproduce import _assert_png
from vi_seg_jax.data.synthetic import write_dataset

TINY = [
    "--features", "4", "8", "8", "16",
    "--patch", "16", "16", "16",
    "--batch-size", "2",
    "--test-size", "1",
    "--validation-size", "1",
    "--train-size", "2",
    "--steps-per-epoch", "3",
    "--validation-samples", "2",
    "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "data"
    write_dataset(root, num_cases=4, shape=(32, 32, 24), seed=1)
    return root


def _env(tmp_path):
    # Compilation dominates these tiny runs: share the suite's compile cache and skip most
    # XLA optimisations.
    from jax import config

    return {
        **os.environ,
        "VI_SEG_JAX_CACHE": str(tmp_path / "cache"),
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": config.jax_compilation_cache_dir,
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }


def _command(data_dir, workdir, *extra):
    return [
        sys.executable,
        "-m",
        "experiments.train",
        "--data-dir",
        str(data_dir),
        "--workdir",
        str(workdir),
        *TINY,
        *extra,
    ]


def _train(tmp_path, data_dir, workdir, *extra, timeout=600):
    return subprocess.run(
        _command(data_dir, workdir, *extra),
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        timeout=timeout,
    )


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "backbone,method",
    [
        ("unet", "vi"),
        ("vnet", "vi"),
        ("fcn", "vi"),
        ("unet", "deterministic"),
        ("unet", "mc_dropout"),
        ("unet", "ensemble"),
    ],
)
def test_each_backbone_and_method_runs_end_to_end(
    tmp_path, data_dir, backbone, method, monkeypatch, capsys
):
    """In-process (the subprocess path is covered below), so compilations are shared."""
    from experiments import train

    monkeypatch.setenv("VI_SEG_JAX_CACHE", str(tmp_path / "cache"))
    workdir = tmp_path / "run"
    features = ["--features", "4", "8", "16"] if backbone == "vnet" else []
    argv = ["--data-dir", str(data_dir), "--workdir", str(workdir), *TINY, *features]
    with jax.numpy_dtype_promotion("standard"):
        status = train.main([*argv, "--backbone", backbone, "--method", method, "--steps", "6"])
    assert status == 0
    stdout = capsys.readouterr().out
    records = _records(workdir)
    assert all("step" in r for r in records)
    training = [r for r in records if "loss" in r]
    validation = [r for r in records if "val_dice" in r]
    assert training and all({"loss", "kl", "dice"} <= r.keys() for r in training)
    assert [r["step"] for r in validation] == [6]
    (result,) = validation
    # One validation case: Dice D and IoU J of one pair of masks obey J = D / (2 − D).
    assert result["val_iou"] == pytest.approx(result["val_dice"] / (2 - result["val_dice"]))
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["best_step"] == 6
    assert summary["final_val_dice"] == summary["best_val_dice"] == result["val_dice"]
    config = json.loads((workdir / "config.json").read_text())
    assert config["backbone"]["name"] == backbone and config["method"]["method"] == method
    # The run's files are readable as a plain open() under the umask would leave them.
    umask = os.umask(0)
    os.umask(umask)
    for path in workdir.rglob("*"):
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == want, path
    if method == "deterministic":
        assert result["val_dice"] == pytest.approx(_validation_dice(workdir), abs=1e-12)
    # Five panels of 3.2 × 3.6 inches at 100 dpi.
    _assert_png(workdir / "validation.png", width=1600, height=360)
    assert (workdir / "checkpoints" / "6").is_dir()
    assert "final val Dice" in stdout
    events = EventAccumulator(str(workdir / "tensorboard"))
    events.Reload()
    assert {"loss", "kl", "dice", "val_dice", "val_iou"} <= set(events.Tags()["scalars"])
    assert events.Tags()["images"] == ["validation"]
    assert f"tensorboard --logdir {workdir / 'tensorboard'}" in stdout


def test_a_three_case_folder_trains_with_no_size_flags_and_augmentation(
    tmp_path, monkeypatch, capsys
):
    from experiments import train

    monkeypatch.setenv("VI_SEG_JAX_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "three"
    write_dataset(data, num_cases=3, shape=(32, 32, 24), seed=2)
    sized = {"--test-size", "--validation-size", "--train-size"}
    tiny = [a for i, a in enumerate(TINY) if a not in sized and TINY[i - 1] not in sized]
    argv = ["--data-dir", str(data), "--workdir", str(tmp_path / "run"), *tiny, "--steps", "3"]
    with jax.numpy_dtype_promotion("standard"):
        assert train.main([*argv, "--augment", "default"]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["augment"] == "default"
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert [len(splits[name]) for name in ("test", "validation")] == [1, 1]
    assert [len(entry["cases"]) for entry in splits["train"]] == [1]
    assert "3 cases: 1 test, 1 validation, 1 training" in capsys.readouterr().out


@pytest.mark.parametrize("sizes", [[], ["--test-size", "5"], ["--train-size", "9"]])
def test_a_broken_file_is_what_the_user_hears_about_whatever_the_sizes(
    tmp_path, monkeypatch, capsys, sizes
):
    from experiments import train
    from experiments.common import run_cli

    monkeypatch.setenv("VI_SEG_JAX_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "two"
    write_dataset(data, num_cases=2, shape=(32, 32, 24), seed=2)
    broken = sorted(data.rglob("*t1ce.nii.gz"))[1]
    broken.write_bytes(b"not a NIfTI file")
    argv = ["--data-dir", str(data), "--workdir", str(tmp_path / "run"), "--no-progress", *sizes]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {broken}") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--prior", "dwp"], "--prior dwp needs --prior-dir"),
        (["--prior-dir", "p"], "--prior-dir is only used with --prior dwp"),
        (["--dwp-init"], "--dwp-init needs --prior dwp"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--method", "ensemble", "--prior", "dwp", "--prior-dir", "p"], "needs --method vi"),
        (["--spatial-dims", "2", "--patch", "8", "8", "8"], "--patch needs 2 numbers for"),
        (["--learning-rate", "-1"], "--learning-rate must be > 0"),
        (["--test-size", "-1"], "--test-size must be >= 0"),
    ],
)
def test_config_rules_are_told_in_the_flags_words(tmp_path, capsys, flags, message):
    from experiments import train

    with pytest.raises(SystemExit) as exit_info:
        train.main(["--workdir", str(tmp_path / "run"), *flags])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in last and "`" not in last
    assert not (tmp_path / "run").exists()


def test_flags_set_what_the_library_decides():
    from experiments import train

    def config(*argv):
        return train.config_from_args(train.parse_args(list(argv))[1])

    assert config("--method", "mc_dropout").backbone.dropout_rate == 0.1
    dwp = config("--prior", "dwp", "--prior-dir", "p")
    assert dwp.method.guide.init_log_var == -10.0 and dwp.prior.directory.endswith("p")
    assert (
        config(
            "--prior", "dwp", "--prior-dir", "p", "--init-log-var", "-3"
        ).method.guide.init_log_var
        == -3.0
    )
    assert config("--spatial-dims", "2").data.patch_shape == (64, 64)
    assert config("--epochs", "3", "--steps-per-epoch", "7").schedule.steps == 21
    assert config("--epochs", "3", "--steps", "5").schedule.steps == 5
    assert config("--patience", "0").schedule.patience_epochs is None
    assert config().data.test_size is None  # sizes come from the dataset


def _validation_dice(workdir):
    """Dice of the saved network's prediction on the validation case, recomputed: one
    forward pass on the cached preprocessed volume, then NumPy (argmax, Dice)."""
    from vi_seg_jax.predict import load_trained

    (case_id,) = json.loads((workdir / "splits.json").read_text())["validation"]
    (folder,) = (workdir.parent / "cache" / "preprocessed").glob(f"*/{case_id}")
    image, label = np.load(folder / "image.npy"), np.load(folder / "label.npy")
    model = load_trained(workdir)
    logits, _ = jax.jit(model.spec.backbone.apply)({"params": model.state.params}, image[None])
    predicted = np.argmax(np.asarray(logits[0], np.float64), axis=-1) == 1
    truth = np.isin(label, (1, 2, 3))  # canonical core, edema, enhancing: the whole tumour
    return 2 * np.sum(predicted & truth) / (predicted.sum() + truth.sum())


def _final_params(workdir):
    import orbax.checkpoint as ocp

    from vi_seg_jax.checkpoint import checkpoint_manager

    manager = checkpoint_manager(workdir / "checkpoints")
    step = manager.latest_step()
    # Onto this process's device, whatever devices wrote the checkpoint.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    saved = ocp.StandardCheckpointer().metadata(workdir / "checkpoints" / str(step) / "state")
    target = jax.tree_util.tree_map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
        saved.item_metadata,
    )
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
    )
    return step, restored


def test_killed_run_resumes_to_the_same_parameters(tmp_path, data_dir):
    steps = ["--steps", "18"]
    reference = tmp_path / "reference"
    assert _train(tmp_path, data_dir, reference, *steps).returncode == 0

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        _command(data_dir, interrupted, *steps),
        env=_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 600
    while not (interrupted / "checkpoints" / "6").is_dir() and time.time() < deadline:
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (interrupted / "checkpoints" / "6").is_dir()
    resumed = _train(tmp_path, data_dir, interrupted, *steps, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    step_a, state_a = _final_params(reference)
    step_b, state_b = _final_params(interrupted)
    assert step_a == step_b == 18
    leaves_a = _leaves(state_a["state"])
    leaves_b = _leaves(state_b["state"])
    assert len(leaves_a) == len(leaves_b) > 10
    for a, b in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(a, b)  # bitwise
    steps_logged = [r["step"] for r in _records(interrupted) if "loss" in r]
    assert steps_logged == sorted(set(steps_logged))  # no duplicated lines after resume


def _leaves(tree):
    import jax

    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(tree)]


def test_existing_checkpoints_are_never_overwritten_without_resume(tmp_path, data_dir):
    workdir = tmp_path / "run"
    assert _train(tmp_path, data_dir, workdir, "--steps", "3").returncode == 0
    again = _train(tmp_path, data_dir, workdir, "--steps", "3")
    assert again.returncode == 2
    assert (
        again.stderr.strip()
        == f"error: {workdir}: already holds checkpoints; pass --resume to continue or choose another --workdir"
    )


def test_resume_refuses_another_backbone(tmp_path, data_dir):
    workdir = tmp_path / "run"
    assert _train(tmp_path, data_dir, workdir, "--steps", "3").returncode == 0
    other = _train(tmp_path, data_dir, workdir, "--steps", "6", "--resume", "--backbone", "fcn")
    assert other.returncode == 2
    assert "checkpoint was written with backbone.name='unet', this run has 'fcn'" in other.stderr
    assert other.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--backbone", "resnet"], "invalid choice: 'resnet'"),
        (["--patch", "16", "16"], "--patch needs 3 numbers"),
        (["--steps", "x"], "invalid int value"),
        (["--validation-size", "0"], "--validation-size must be >= 1"),
        (["--devices", "4"], "--devices 4: 1 device(s) available"),
        (["--precision", "fp16"], "invalid choice: 'fp16'"),
    ],
)
def test_bad_flags_are_one_line_errors_with_exit_code_2(tmp_path, data_dir, flags, message):
    result = _train(tmp_path, data_dir, tmp_path / "run", *flags)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_data_is_a_one_line_error_with_exit_code_2(tmp_path):
    (tmp_path / "empty").mkdir()
    result = _train(tmp_path, tmp_path / "empty", tmp_path / "run")
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"error: {tmp_path / 'empty'}: empty folder")
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir()
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def test_two_processes_train_like_one_process_with_two_devices(tmp_path, data_dir):
    """jax.distributed on localhost: two CPU processes of one device each."""
    steps = ["--steps", "6"]
    multi = tmp_path / "multi"
    join = ["--coordinator-address", f"localhost:{_free_port()}", "--num-processes", "2"]
    processes = [
        subprocess.Popen(
            _command(data_dir, multi, *steps, *join, "--process-id", str(index)),
            env=_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(2)
    ]
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]

    single = tmp_path / "single"
    env = {**_env(tmp_path), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = subprocess.run(
        _command(data_dir, single, *steps, "--devices", "2"),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    step_a, state_a = _final_params(multi)
    step_b, state_b = _final_params(single)
    assert step_a == step_b == 6
    leaves_a, leaves_b = _leaves(state_a["state"]), _leaves(state_b["state"])
    assert len(leaves_a) == len(leaves_b) > 10
    for a, b in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Process 0 alone logs: every step once.
    logged = [r["step"] for r in _records(multi) if "loss" in r]
    assert logged == [r["step"] for r in _records(single) if "loss" in r]
    assert json.loads((multi / "summary.json").read_text())["steps"] == 6
    assert "final val Dice" in outputs[0][0]
