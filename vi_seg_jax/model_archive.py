"""A trained model as one portable file: what prediction needs, readable without pickle.

`export_model(run_dir, out_path)` packs a training workdir's best (or given) checkpoint
into one archive; `load_archive(path)` gives back the `TrainedModel` that
`run_folder.read_run(run_dir)` gives, with the same arrays bit for bit, minus the
optimiser state, which prediction never reads (its `state.opt_state` is None).

The archive is a zip file (readable with `unzip`, Python's `zipfile` and `numpy.load`):

    mimetype          "application/vnd.vi-seg-jax.model+zip", first and uncompressed, so
                      that bytes 38.. of the file identify it (as in EPUB and OpenDocument)
    manifest.json     format name and version, the package version that wrote it, and the
                      SHA-256 and size of every other member
    model.json        step, backbone, method, task, regions, modalities, output classes,
                      the source run's folder name
    config.json       the run's `TrainConfig`
    calibration.json  the run's `calibration.json` record when it was fitted for this step
                      (temperatures, ECEs, the `Predictor.settings()` used), else {}
    state/...npy      one `.npy` per array of the state, named by its tree path:
                      `state/step.npy`, `state/params/<layer>/.../kernel.npy`,
                      `state/guide/loc/...`, `state/guide/log_var/...`, `state/key.npy`
                      (the raw key data), `state/prior_params/...` when prediction uses
                      a trained prior's parameters

Nothing in it is pickled: JSON is parsed and arrays are read with
`numpy.load(allow_pickle=False)`, so loading a stranger's archive runs no code. Every
member is checked against its manifest size and checksum before it is parsed; a damaged,
truncated, incomplete or foreign file, or one of a newer format version, is refused with a
one-line `DataError` naming the file. Archives are written atomically (a temporary file in
the same folder, then a rename) with fixed member timestamps, so one checkpoint always
gives the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import vi_seg_jax
from vi_seg_jax.calibration import CALIBRATION_FILE
from vi_seg_jax.data.conventions import CANONICAL_CLASS_NAMES
from vi_seg_jax.errors import DataError, first_line
from vi_seg_jax.io.folders import new_file_mode
from vi_seg_jax.run_folder import TrainedModel, read_run
from vi_seg_jax.train.build import build_spec
from vi_seg_jax.train.config import TrainConfig
from vi_seg_jax.train.state import TrainState, create_train_state

FORMAT = "vi_seg_jax.model"
FORMAT_VERSION = 1
MIMETYPE = b"application/vnd.vi-seg-jax.model+zip"
SUFFIX = ".vsj"

_MANIFEST = "manifest.json"
_STATE_PREFIX = "state/"
_JSON_MEMBERS = ("model.json", "config.json", "calibration.json")
# A local file header is 30 bytes, then the member's name, then (stored, no extra field)
# its data: an archive starts with these bytes.
_HEADER = b"PK\x03\x04"
_MIMETYPE_AT = 30 + len("mimetype")
_MAX_MANIFEST_BYTES = 16 * 2**20
_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can hold: reproducible bytes


def is_model_archive(path: str | Path) -> bool:
    """Whether `path` is a file that starts like a model archive (reads its first 74 bytes).

    True for a damaged or truncated archive too, so that `load_archive` says what is
    wrong with it; False for folders, missing files and any other file.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(_MIMETYPE_AT + len(MIMETYPE))
    except OSError:  # missing, a folder, unreadable
        return False
    return (
        head.startswith(_HEADER)
        and head[30:_MIMETYPE_AT] == b"mimetype"
        and head[_MIMETYPE_AT:] == MIMETYPE
    )


def export_model(
    run_dir: str | Path, out_path: str | Path, step: int | None = None
) -> dict[str, object]:
    """Writes the run's best checkpoint (or `step`'s) to one archive file at `out_path`.

    The checkpoint is chosen and checked as `run_folder.read_run` does. An existing archive
    at `out_path` is replaced (atomically); any other existing file is left alone.

    Returns:
      What `model.json` records, with the `temperature` per region (empty when none was
      fitted for the step), and `path` and `bytes` of the written archive.

    Raises:
      DataError: not a training workdir, no such checkpoint, or `out_path` is a folder or a
        file that is not a model archive.
    """
    run_dir, out_path = Path(run_dir), Path(out_path)
    if out_path.is_dir():
        raise DataError(out_path, "is a folder; give the archive's file name")
    if out_path.exists() and not is_model_archive(out_path):
        raise DataError(out_path, "exists and is not a model archive; not replacing it")
    model = read_run(run_dir, step)
    # The whole record, with its ECEs.
    calibration = _calibration_record(run_dir, model.step) or None
    info = write_archive(model, out_path, calibration=calibration)
    return {
        **info,
        "temperature": dict(model.temperatures),
        "path": str(out_path),
        "bytes": out_path.stat().st_size,
    }


def write_archive(
    model: TrainedModel, out_path: str | Path, *, calibration: dict | None = None
) -> dict[str, object]:
    """Writes `model` (without optimiser state) to the archive `out_path`, atomically.

    `calibration`: the record to store as calibration.json (it must hold `temperature` and
    `predictor` when it is not empty); None: one made of `model.temperatures` and
    `model.calibrated_with`. Returns what `model.json` records.
    """
    out_path = Path(out_path)
    if calibration is None:
        calibration = (
            {
                "step": model.step,
                "temperature": dict(model.temperatures),
                "predictor": dict(model.calibrated_with),
            }
            if model.temperatures
            else {}
        )
    info = _model_info(model)
    members: dict[str, bytes] = {
        "model.json": _json_bytes(info),
        "config.json": _json_bytes(model.config.to_dict()),
        "calibration.json": _json_bytes(calibration),
    }
    for name, leaf in _named_leaves(_portable(model.state)):
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(leaf), allow_pickle=False)
        members[name] = buffer.getvalue()
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": vi_seg_jax.__version__,
        "members": {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            for name, data in members.items()
        },
    }
    _write_zip_atomic(out_path, {**members, _MANIFEST: _json_bytes(manifest)})
    return info


def load_archive(path: str | Path, step: int | None = None) -> TrainedModel:
    """The `TrainedModel` stored in the archive at `path` (`workdir` is the archive's path).

    `step`: the step the caller expects (e.g. `load_trained`'s argument); None accepts the
    archive's one step. The state's `opt_state` is None: an archive holds no optimiser state.

    Raises:
      DataError (a ValueError): a missing file, a file that is not a model archive, one of a
        newer format version, or a damaged one (truncated, a checksum or size that does not
        match the manifest, a member missing or added), or `step` is not the archive's.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "no such file")
    if not path.is_file():
        raise DataError(path, "is not a file (a model archive is one file)")
    if not is_model_archive(path):
        raise DataError(path, "is not a vi_seg_jax model archive")
    try:
        with zipfile.ZipFile(path) as archive:
            members = _checked_members(path, archive)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
        raise DataError(path, f"is damaged or truncated ({first_line(error)})") from None
    info = _json_member(path, members, "model.json")
    if not isinstance(info, dict) or not isinstance(info.get("step"), int):
        raise DataError(path, "model.json holds no step")
    if step is not None and step != info["step"]:
        raise DataError(path, f"holds step {info['step']}, not step {step}")
    config_data = _json_member(path, members, "config.json")
    try:
        config = TrainConfig.from_dict(config_data)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise DataError(
            path, f"config.json is not a valid configuration ({first_line(error)})"
        ) from None
    calibration = _json_member(path, members, "calibration.json")
    if not isinstance(calibration, dict):
        raise DataError(path, "calibration.json is not a JSON object")
    spec = build_spec(config, num_data=1.0, with_prior=False)
    state = _restore_state(path, config, spec, members)
    if int(state.step) != info["step"]:
        raise DataError(path, f"model.json says step {info['step']}, the state {int(state.step)}")
    return TrainedModel(
        path,
        config,
        spec,
        state,
        info["step"],
        dict(calibration.get("temperature", {})),
        dict(calibration.get("predictor", {})),
    )


def _calibration_record(run_dir: Path, step: int) -> dict:
    """The run's calibration.json when it was fitted for `step` (as `run_folder.read_run` reads)."""
    path = run_dir / CALIBRATION_FILE
    if not path.is_file():
        return {}
    record = json.loads(path.read_text())
    return record if record.get("step") == step else {}


def _model_info(model: TrainedModel) -> dict[str, object]:
    config = model.config
    return {
        "step": model.step,
        "backbone": config.backbone.name,
        "spatial_dims": config.backbone.spatial_dims,
        "method": config.method.method,
        "task": model.task,
        "regions": list(model.regions),
        "modalities": list(config.data.modalities),
        # The network predicts canonical classes; `predict` writes each input dataset's own
        # release labels (`LabelConvention.from_canonical`).
        "classes": {str(value): name for value, name in enumerate(CANONICAL_CLASS_NAMES)},
        "source_run": Path(model.workdir).absolute().name,
    }


def _json_bytes(data) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def _portable(state: TrainState) -> TrainState:
    """What the archive holds of a state: no optimiser state, the key as raw key data."""
    return state.replace(opt_state=None, key=jax.random.key_data(state.key))


def _member_name(path: tuple) -> str:
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:  # a pytree node type this format does not name
            raise TypeError(f"cannot name the state path {jax.tree_util.keystr(path)}")
    return _STATE_PREFIX + "/".join(parts) + ".npy"


def _named_leaves(tree) -> list[tuple[str, object]]:
    named = [(_member_name(p), leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(tree)]
    names = [name for name, _ in named]
    if len(set(names)) != len(names):
        raise ValueError("two state arrays map to the same archive member name")
    return named


def _write_zip_atomic(path: Path, members: dict[str, bytes]) -> None:
    """The archive: `mimetype` first and stored, then `members`; temporary file + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, new_file_mode())  # mkstemp creates owner-only files
        with os.fdopen(fd, "wb") as f:
            with zipfile.ZipFile(f, "w") as archive:
                _add(archive, "mimetype", MIMETYPE, zipfile.ZIP_STORED)
                for name, data in members.items():
                    # Weights hardly compress; JSON does.
                    is_array = name.startswith(_STATE_PREFIX)
                    method = zipfile.ZIP_STORED if is_array else zipfile.ZIP_DEFLATED
                    _add(archive, name, data, method)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _add(archive: zipfile.ZipFile, name: str, data: bytes, method: int) -> None:
    info = zipfile.ZipInfo(name, date_time=_DATE_TIME)
    info.compress_type = method
    info.external_attr = 0o644 << 16
    archive.writestr(info, data)


def _checked_members(path: Path, archive: zipfile.ZipFile) -> dict[str, bytes]:
    """Every member but the manifest and mimetype, checked against the manifest."""
    infos = archive.infolist()
    names = [info.filename for info in infos]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise DataError(path, f"holds member {duplicated[0]} twice")
    by_name = {info.filename: info for info in infos}
    if _MANIFEST not in by_name:
        raise DataError(path, f"has no {_MANIFEST} (damaged or incomplete archive)")
    if by_name[_MANIFEST].file_size > _MAX_MANIFEST_BYTES:
        raise DataError(path, f"{_MANIFEST} is implausibly large")
    try:
        manifest = json.loads(archive.read(_MANIFEST))
    except (ValueError, UnicodeDecodeError) as error:
        raise DataError(path, f"{_MANIFEST} is not valid JSON ({first_line(error)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(path, f"is not a vi_seg_jax model archive ({_MANIFEST} names no {FORMAT})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise DataError(path, f"has an invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise DataError(
            path,
            f"has format version {version}, newer than this vi_seg_jax "
            f"({vi_seg_jax.__version__}) reads ({FORMAT_VERSION}); upgrade vi_seg_jax "
            f"(the archive was written by {manifest.get('package_version', 'an unknown version')})",
        )
    listed = manifest.get("members")
    if not isinstance(listed, dict):
        raise DataError(path, f"{_MANIFEST} lists no members")
    present = set(by_name) - {_MANIFEST, "mimetype"}
    missing = sorted(set(listed) - present)
    if missing:
        raise DataError(path, f"is missing member {missing[0]} (incomplete archive)")
    unexpected = sorted(present - set(listed))
    if unexpected:
        raise DataError(path, f"holds member {unexpected[0]}, which its manifest does not list")
    for name in _JSON_MEMBERS:
        if name not in listed:
            raise DataError(path, f"has no {name}")
    members = {}
    for name, record in listed.items():
        if not isinstance(record, dict) or by_name[name].file_size != record.get("bytes"):
            raise DataError(path, f"member {name} does not have the size its manifest records")
        data = archive.read(name)  # also checks the zip's own CRC-32
        if hashlib.sha256(data).hexdigest() != record.get("sha256"):
            raise DataError(path, f"member {name} fails its checksum (the file is damaged)")
        members[name] = data
    return members


def _json_member(path: Path, members: dict[str, bytes], name: str):
    try:
        return json.loads(members[name])
    except (ValueError, UnicodeDecodeError) as error:
        raise DataError(path, f"{name} is not valid JSON ({first_line(error)})") from None


def _restore_state(path: Path, config: TrainConfig, spec, members: dict[str, bytes]) -> TrainState:
    """The state's arrays, in the structure `load_trained` restores (opt_state None)."""
    patch = tuple(config.data.patch_shape)
    dummy = jax.ShapeDtypeStruct((1, *patch, len(config.data.modalities)), jnp.float32)
    like = jax.eval_shape(lambda x: create_train_state(jax.random.key(0), spec, x), dummy)
    abstract = jax.eval_shape(_portable, like)
    named = _named_leaves(abstract)
    wanted = {name for name, _ in named}
    extra = sorted(n for n in members if n.startswith(_STATE_PREFIX) and n not in wanted)
    if extra:
        raise DataError(path, f"holds {extra[0]}, which the {config.backbone.name} model lacks")
    leaves = []
    for name, like_leaf in named:
        if name not in members:
            raise DataError(path, f"holds no {name}, which the {config.backbone.name} model needs")
        try:
            array = np.load(io.BytesIO(members[name]), allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise DataError(path, f"{name} is not a readable array ({first_line(error)})") from None
        if array.shape != like_leaf.shape or array.dtype != like_leaf.dtype:
            raise DataError(
                path,
                f"{name} is {array.dtype}{list(array.shape)}, the model needs "
                f"{like_leaf.dtype}{list(like_leaf.shape)}",
            )
        leaves.append(array)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    tree = jax.tree_util.tree_structure(abstract)
    state = jax.device_put(jax.tree_util.tree_unflatten(tree, leaves), device)
    return state.replace(key=jax.random.wrap_key_data(state.key))
