"""The portable model archive: a bitwise round trip, the same predictions, refused damage."""

import dataclasses
import hashlib
import json
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vi_seg_jax.checkpoint import checkpoint_manager, save_checkpoint
from vi_seg_jax.data.discovery import discover_cases
from vi_seg_jax.data.synthetic import write_dataset
from vi_seg_jax.errors import DataError
from vi_seg_jax.methods import MethodConfig
from vi_seg_jax.model_archive import (
    FORMAT_VERSION,
    export_model,
    is_model_archive,
    load_archive,
)
from vi_seg_jax.predict import Predictor, load_trained
from vi_seg_jax.train.build import build_spec
from vi_seg_jax.train.config import BackboneConfig, DataConfig, TrainConfig
from vi_seg_jax.train.state import create_train_state

BEST, LAST = 2, 4
TEMPERATURE = {"wt": 1.7}
PREDICTOR = {"samples": 2, "window": 32, "overlap": 0.25}


def write_tiny_run(workdir, method="vi"):
    """A training workdir as `train` leaves it (config, checkpoints at steps 2 and 4 with 2
    the best by validation Dice, summary, calibration for step 2), written directly."""
    config = TrainConfig(
        backbone=BackboneConfig(features=(4, 8)),
        method=MethodConfig(method=method),
        data=DataConfig(patch_shape=(8, 8, 8)),
    )
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(config.to_json())
    spec = build_spec(config, num_data=1.0)
    state = create_train_state(jax.random.key(0), spec, jnp.zeros((1, 8, 8, 8, 4)))
    manager = checkpoint_manager(workdir / "checkpoints")
    for step, dice in ((BEST, 0.6), (LAST, 0.5)):
        moved = state.replace(
            step=jnp.asarray(step, jnp.int32),
            params=jax.tree.map(lambda x, s=step: x + 0.01 * s, state.params),
        )
        if state.guide is not None:  # a wide posterior, so that samples differ
            guide = dataclasses.replace(
                state.guide, log_var=jax.tree.map(lambda v: v + 4.0, state.guide.log_var)
            )
            moved = moved.replace(guide=guide)
        meta = {"config": config.to_dict(), "sampler_position": step}
        save_checkpoint(manager, moved, meta, metrics={"val_dice": dice})
    (workdir / "summary.json").write_text(json.dumps({"best_step": BEST}))
    calibration = {"step": BEST, "temperature": TEMPERATURE, "predictor": PREDICTOR, "ece": 0.1}
    (workdir / "calibration.json").write_text(json.dumps(calibration))
    return workdir


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("archive") / "run")


@pytest.fixture(scope="module")
def archive(run):
    out = run.parent / "model.vsj"
    export_model(run, out)
    return out


def _bits(tree):
    return [
        (jax.tree_util.keystr(path), np.asarray(leaf).dtype, np.asarray(leaf).tobytes())
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    ]


def _assert_same_model(archived, trained):
    assert archived.config == trained.config
    assert archived.step == trained.step
    assert archived.temperatures == trained.temperatures
    assert archived.calibrated_with == trained.calibrated_with
    assert archived.spec == trained.spec
    assert archived.state.opt_state is None  # an archive holds no optimiser state
    a, t = archived.state, trained.state
    for field in ("step", "params", "guide", "prior_params"):
        assert _bits(getattr(a, field)) == _bits(getattr(t, field)), field
    assert _bits(jax.random.key_data(a.key)) == _bits(jax.random.key_data(t.key))
    assert jax.random.key_impl(a.key) == jax.random.key_impl(t.key)


def test_round_trip_gives_load_trained_bit_for_bit(run, archive):
    trained = load_trained(run)
    assert trained.step == BEST and trained.temperatures == TEMPERATURE
    archived = load_archive(archive)
    assert archived.workdir == archive and archived.task == "wt"
    _assert_same_model(archived, trained)
    assert is_model_archive(archive)
    assert not is_model_archive(run) and not is_model_archive(run / "config.json")
    assert not is_model_archive(run / "missing.vsj")


def test_members_hold_no_optimiser_state_and_are_described(run, archive):
    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
        manifest = json.loads(z.read("manifest.json"))
        info = json.loads(z.read("model.json"))
        calibration = json.loads(z.read("calibration.json"))
    assert names[0] == "mimetype"
    assert not any("opt_state" in n or n.endswith(".pkl") for n in names)
    assert {"model.json", "config.json", "calibration.json", "state/step.npy"} <= set(names)
    assert any(n.startswith("state/guide/log_var/") for n in names)
    assert set(manifest["members"]) == set(names) - {"mimetype", "manifest.json"}
    assert manifest["format_version"] == FORMAT_VERSION and manifest["package_version"]
    assert info["step"] == BEST and info["backbone"] == "unet" and info["regions"] == ["wt"]
    assert calibration["temperature"] == TEMPERATURE and calibration["ece"] == 0.1


def test_an_explicit_step_and_a_second_export_of_it(run, tmp_path):
    out = tmp_path / "last.vsj"
    record = export_model(run, out, step=LAST)
    assert record["step"] == LAST and record["bytes"] == out.stat().st_size
    archived = load_archive(out)
    # No temperatures were fitted for this step, as load_trained reads it.
    _assert_same_model(archived, load_trained(run, LAST))
    assert archived.temperatures == {}
    again = tmp_path / "again.vsj"
    export_model(run, again, step=LAST)  # same checkpoint, same bytes
    assert again.read_bytes() == out.read_bytes()
    with pytest.raises(DataError, match=f"holds step {LAST}, not step {BEST}"):
        load_archive(out, BEST)


@pytest.mark.parametrize("method", ["deterministic", "ensemble"])
def test_runs_without_a_guide_round_trip(tmp_path, method):
    run = write_tiny_run(tmp_path / "run", method=method)
    export_model(run, tmp_path / "map.vsj")
    archived = load_archive(tmp_path / "map.vsj")
    assert archived.state.guide is None
    _assert_same_model(archived, load_trained(run))


def test_the_archive_predicts_what_the_run_folder_predicts(run, archive, tmp_path):
    write_dataset(tmp_path / "data", num_cases=1, shape=(20, 16, 16), seed=3)
    (case,) = discover_cases(tmp_path / "data", require_labels=False).cases
    settings = dict(num_samples=2, window_size=32)
    from_run = Predictor(load_trained(run), **settings).predict_case(case, progress=False)
    from_archive = Predictor(load_archive(archive), **settings).predict_case(case, progress=False)
    assert from_run.uncalibrated is not None  # the temperature is applied
    for field in ("labels", "probabilities", "uncalibrated", "aleatoric", "epistemic"):
        np.testing.assert_array_equal(getattr(from_archive, field), getattr(from_run, field))


def _rewrite(source, target, change):
    """Copies the archive member by member, passing each (name, bytes) through `change`."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            changed = change(info.filename, old.read(info.filename))
            if changed is not None:
                new.writestr(info, changed)
    return target


def _one_line_error(path, *fragments):
    with pytest.raises(DataError) as caught:
        load_archive(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_damaged_archives_are_refused_in_one_line(archive, tmp_path):
    data = archive.read_bytes()
    truncated = tmp_path / "truncated.vsj"
    truncated.write_bytes(data[: len(data) // 2])
    assert is_model_archive(truncated)  # ours, so load_trained would say what is wrong
    _one_line_error(truncated, "damaged or truncated")

    with zipfile.ZipFile(archive) as z:
        member = max(z.infolist(), key=lambda i: i.file_size)  # a stored kernel
    flipped = bytearray(data)
    flipped[member.header_offset + 30 + len(member.filename) + 200] ^= 0xFF
    (tmp_path / "flipped.vsj").write_bytes(bytes(flipped))
    _one_line_error(tmp_path / "flipped.vsj", "damaged")

    def tamper(name, body):  # a valid zip whose member no longer matches the manifest
        return body[:-4] + bytes(4) if name == member.filename else body

    _one_line_error(_rewrite(archive, tmp_path / "tampered.vsj", tamper), "fails its checksum")

    def drop(name, body):
        return None if name == "calibration.json" else body

    _one_line_error(_rewrite(archive, tmp_path / "partial.vsj", drop), "missing member")


def test_foreign_and_newer_files_are_refused_in_one_line(archive, tmp_path):
    _one_line_error(tmp_path / "absent.vsj", "no such file")
    _one_line_error(tmp_path, "not a file")
    foreign = tmp_path / "foreign.zip"
    with zipfile.ZipFile(foreign, "w") as z:
        z.writestr("weights.npy", b"\x93NUMPY")
    assert not is_model_archive(foreign)
    _one_line_error(foreign, "not a vi_seg_jax model archive")

    def newer(name, body):
        if name != "manifest.json":
            return body
        return json.dumps({**json.loads(body), "format_version": FORMAT_VERSION + 1}).encode()

    _one_line_error(_rewrite(archive, tmp_path / "newer.vsj", newer), "newer", "upgrade")

    # Members whose manifest entries match, but which are not what the model needs.
    pickled = b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, 'shape': (), }"
    replaced = _replace_member(archive, tmp_path / "pickled.vsj", "state/step.npy", pickled)
    _one_line_error(replaced, "state/step.npy is not a readable array")
    config = json.loads(load_archive(archive).config.to_json())
    config["backbone"]["from_the_future"] = 1
    body = json.dumps(config).encode()
    replaced = _replace_member(archive, tmp_path / "future.vsj", "config.json", body)
    _one_line_error(replaced, "config.json is not a valid configuration", "from_the_future")


def _replace_member(source, target, member, new_body):
    """The archive with `member` replaced and its manifest entry updated to match."""

    def change(name, body):
        if name == member:
            return new_body
        if name == "manifest.json":
            manifest = json.loads(body)
            manifest["members"][member] = {
                "sha256": hashlib.sha256(new_body).hexdigest(),
                "bytes": len(new_body),
            }
            return json.dumps(manifest).encode()
        return body

    return _rewrite(source, target, change)


def test_export_leaves_other_files_and_folders_alone(run, tmp_path):
    precious = tmp_path / "notes.txt"
    precious.write_text("keep me")
    with pytest.raises(DataError, match="not a model archive; not replacing it"):
        export_model(run, precious)
    assert precious.read_text() == "keep me"
    with pytest.raises(DataError, match="is a folder"):
        export_model(run, tmp_path)
    with pytest.raises(DataError, match=r"no config\.json"):
        export_model(tmp_path / "nowhere", tmp_path / "model.vsj")
    assert not list(tmp_path.glob("*.vsj")) and not list(tmp_path.glob(".*.tmp"))
