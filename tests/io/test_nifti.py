import os

import nibabel as nib
import numpy as np
import pytest

from vi_seg_jax.errors import DataError
from vi_seg_jax.io import read_nifti, read_nifti_header, write_nifti

AFFINE = np.array([[-0.9, 0.1, 0, 80], [0.05, 1.1, 0, -100], [0, 0, 2.5, -60], [0, 0, 0, 1]])


def _source(tmp_path):
    """A source scan with an oblique affine, qform/sform codes and units to preserve."""
    image = nib.Nifti1Image(np.arange(60, dtype=np.int16).reshape(3, 4, 5), AFFINE)
    image.header.set_qform(AFFINE, code=1)
    image.header.set_sform(AFFINE, code=2)
    image.header.set_xyzt_units("mm", "sec")
    path = tmp_path / "source.nii.gz"
    nib.save(image, path)
    return path


def test_read_returns_data_affine_and_header(tmp_path):
    volume = read_nifti(_source(tmp_path))
    np.testing.assert_array_equal(volume.data, np.arange(60).reshape(3, 4, 5))
    assert volume.data.dtype == np.float32
    np.testing.assert_allclose(volume.affine, AFFINE)
    assert volume.header.get_xyzt_units() == ("mm", "sec")
    info = read_nifti_header(tmp_path / "source.nii.gz")
    assert info.shape == (3, 4, 5)
    np.testing.assert_allclose(info.affine, AFFINE)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_label_map_keeps_the_source_geometry(tmp_path, suffix):
    source = read_nifti(_source(tmp_path))
    labels = np.zeros((3, 4, 5), np.uint8)
    labels[1, 2, 3] = 4
    out = write_nifti(
        tmp_path / f"seg{suffix}", labels, affine=source.affine, header=source.header, kind="label"
    )
    written = nib.load(out)
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), labels)
    np.testing.assert_allclose(written.affine, AFFINE)
    assert int(written.header["sform_code"]) == 2
    assert int(written.header["qform_code"]) == 1
    assert written.header.get_xyzt_units() == ("mm", "sec")


def test_float_map_is_stored_unscaled_float32(tmp_path):
    source = read_nifti(_source(tmp_path))
    values = np.linspace(0, 1, 60, dtype=np.float64).reshape(3, 4, 5) ** 3
    out = write_nifti(tmp_path / "prob.nii.gz", values, affine=source.affine, header=source.header)
    written = nib.load(out)
    assert written.get_data_dtype() == np.float32
    np.testing.assert_array_equal(written.get_fdata(dtype=np.float32), values.astype(np.float32))


def test_label_map_rejects_fractions(tmp_path):
    with pytest.raises(ValueError, match="label maps must hold integers"):
        write_nifti(
            tmp_path / "seg.nii.gz", np.full((2, 2, 2), 0.5), affine=np.eye(4), kind="label"
        )


def test_write_is_atomic_when_saving_fails(tmp_path, monkeypatch):
    path = tmp_path / "seg.nii.gz"
    write_nifti(path, np.ones((2, 2, 2), np.uint8), affine=np.eye(4), kind="label")
    before = path.read_bytes()

    def crash(image, filename):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        write_nifti(path, np.zeros((2, 2, 2), np.uint8), affine=np.eye(4), kind="label")
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["seg.nii.gz"]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=rf"^{tmp_path}/absent.nii.gz: file not found$"):
        read_nifti(tmp_path / "absent.nii.gz")
