"""experiments.export: one model file from a run, and one-line errors on bad input."""

import pytest

from experiments import export
from tests.experiments.test_predict_evaluate import _cli as _command
from tests.experiments.test_predict_evaluate import _one_line_error
from tests.test_model_archive import BEST, _assert_same_model, write_tiny_run
from vi_seg_jax.errors import DataError
from vi_seg_jax.model_archive import load_archive
from vi_seg_jax.predict import load_trained


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("export") / "run")


def test_export_writes_the_best_checkpoint_and_says_so(run, tmp_path, capsys):
    out = tmp_path / "models" / "tiny.vsj"
    assert export.main(["--checkpoint", str(run), "--out", str(out)]) == 0
    message = capsys.readouterr().err.strip()
    assert message.startswith(f"wrote {out} (") and "KiB" in message
    assert f"checkpoint step {BEST}" in message and "temperature wt 1.7" in message
    _assert_same_model(load_archive(out), load_trained(run))
    assert export.main(["--checkpoint", str(run), "--out", str(out), "--step", "4"]) == 0
    assert load_archive(out).step == 4  # an archive is replaced
    assert "no temperatures" in capsys.readouterr().err


def _cli(*args):
    return _command("export", *args)


def test_bad_input_exits_2_with_one_line(run, tmp_path):
    _one_line_error(
        _cli("--checkpoint", tmp_path / "nowhere", "--out", tmp_path / "m.vsj"),
        "error:",
        "nowhere",
        "no config.json",
    )
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    _one_line_error(
        _cli("--checkpoint", run, "--out", notes, "--step", "3"),
        str(notes),
        "not a model archive",
    )
    assert notes.read_text() == "keep me"
    # In-process: what run_cli turns into the same one line and exit code.
    with pytest.raises(DataError, match=r"no checkpoint at step 3; available: \[2, 4\]"):
        export.main(["--checkpoint", str(run), "--out", str(tmp_path / "m.vsj"), "--step", "3"])
    assert not (tmp_path / "m.vsj").exists()
    with pytest.raises(SystemExit) as caught:  # argparse: usage and the error, exit 2
        export.parse_args(["--checkpoint", str(run)])
    assert caught.value.code == 2


def test_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit):
        export.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and text.count("(default:") == 1
    assert "best by validation Dice" in text


def test_predict_takes_an_archive_and_writes_the_run_folders_maps(run, tmp_path, monkeypatch):
    from experiments import predict
    from vi_seg_jax.data.synthetic import write_dataset
    from vi_seg_jax.io.nifti import read_nifti

    monkeypatch.setenv("VI_SEG_JAX_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    write_dataset(data, num_cases=1, shape=(32, 32, 24), seed=3)
    model = tmp_path / "tiny.vsj"
    assert export.main(["--checkpoint", str(run), "--out", str(model)]) == 0
    common = ["--input", str(data), "--samples", "2", "--window", "32", "--no-progress"]
    for name, checkpoint in (("from_run", run), ("from_archive", model)):
        argv = ["--checkpoint", str(checkpoint), "--out", str(tmp_path / name), *common]
        assert predict.main(argv) == 0
    written = sorted(p.name for p in (tmp_path / "from_run").glob("*.nii.gz"))
    assert written and written == sorted(
        p.name for p in (tmp_path / "from_archive").glob("*.nii.gz")
    )
    for name in written:
        ours = read_nifti(tmp_path / "from_archive" / name)
        theirs = read_nifti(tmp_path / "from_run" / name)
        assert (ours.data == theirs.data).all() and (ours.affine == theirs.affine).all(), name
