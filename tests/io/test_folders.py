"""Atomic writes: complete or absent, and readable as a plain open() would leave them."""

import os
import stat

import numpy as np
import pytest

from vi_seg_jax.io.folders import (
    replace_folder,
    write_csv_atomic,
    write_json_atomic,
    write_text_atomic,
)
from vi_seg_jax.io.nifti import write_nifti


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_files_get_the_mode_of_a_plain_open(tmp_path, umask):
    plain = tmp_path / "plain.txt"
    with open(plain, "w") as handle:
        handle.write("x")
    expected = _mode(plain)
    assert expected == 0o666 & ~umask
    written = {
        "text": tmp_path / "a.txt",
        "json": tmp_path / "a.json",
        "csv": tmp_path / "a.csv",
        "nifti": tmp_path / "a.nii.gz",
    }
    write_text_atomic(written["text"], "hello\n")
    write_json_atomic(written["json"], {"b": 1, "a": [2]})
    write_csv_atomic(written["csv"], ["x", "y"], [[1, 2], [3, 4]])
    write_nifti(written["nifti"], np.zeros((2, 2, 2), np.float32), affine=np.eye(4))
    for kind, path in written.items():
        assert _mode(path) == expected, kind
    assert written["json"].read_text() == '{\n  "a": [\n    2\n  ],\n  "b": 1\n}\n'
    assert written["csv"].read_text().splitlines() == ["x,y", "1,2", "3,4"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries


def test_a_replaced_folder_gets_the_mode_of_a_plain_mkdir(tmp_path, umask):
    import tempfile

    target = tmp_path / "prior"
    for version in ("old", "new"):
        staging = tempfile.mkdtemp(dir=tmp_path)  # owner-only, as every stager makes it
        (tmp_path / staging / "file").write_text(version)
        replace_folder(tmp_path / staging, target)
    assert (target / "file").read_text() == "new"
    assert _mode(target) == 0o777 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prior"]
