import gzip

import numpy as np
import pytest

from tests.data.cases import AFFINE, SHAPE, canonical_label, write_case
from vi_seg_jax.data.conventions import BRATS_2018_2021, MODALITIES
from vi_seg_jax.data.discovery import discover_cases
from vi_seg_jax.data.loading import load_case
from vi_seg_jax.errors import DataError
from vi_seg_jax.io.nifti import read_nifti, write_nifti


def _only_case(root, **kwargs):
    return discover_cases(root, **kwargs).cases[0]


def test_every_layout_loads_to_the_same_canonical_arrays(layout_dataset):
    _, root = layout_dataset
    for case in discover_cases(root).cases:
        volumes = load_case(case, MODALITIES)
        assert volumes.image.shape == (*SHAPE, 4)
        assert volumes.image.dtype == np.float32
        np.testing.assert_array_equal(volumes.label, canonical_label())
        np.testing.assert_allclose(volumes.affine, AFFINE)
        # The channel order is the requested one whatever the file order: 10 t1, 20 t1ce, ...
        # for one-file-per-modality layouts; MSD stores FLAIR first.
        assert np.all(volumes.image[1:-1, 1:-1, 1:-1].min(axis=(0, 1, 2)) > 0)


def test_msd_channels_are_reordered_to_the_request(tmp_path):
    write_case(tmp_path, "msd", "BRATS_001")
    image = load_case(_only_case(tmp_path), ("flair", "t2")).image
    raw = read_nifti(tmp_path / "imagesTr" / "BRATS_001.nii.gz").data
    np.testing.assert_array_equal(image[..., 0], raw[..., 0])
    np.testing.assert_array_equal(image[..., 1], raw[..., 3])


def test_truncated_gzip_names_the_file(tmp_path):
    folder = write_case(tmp_path, "brats2021", "BraTS2021_00001")
    path = folder / "BraTS2021_00001_t2.nii.gz"
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(DataError, match=rf"^{path}: (not a readable NIfTI|corrupt or truncated)"):
        load_case(_only_case(tmp_path), MODALITIES)


def test_truncated_voxel_data_names_the_file(tmp_path):
    folder = write_case(tmp_path, "brats2021", "BraTS2021_00001")
    path = folder / "BraTS2021_00001_flair.nii.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) - 40]))  # header intact, voxels cut short
    with pytest.raises(DataError, match=rf"^{path}: corrupt or truncated NIfTI data"):
        load_case(_only_case(tmp_path), MODALITIES)


def test_garbage_file_names_the_file(tmp_path):
    folder = write_case(tmp_path, "brats2021", "BraTS2021_00001")
    path = folder / "BraTS2021_00001_t1.nii.gz"
    path.write_bytes(b"this is not a nifti file at all" * 20)
    with pytest.raises(DataError, match=rf"^{path}: not a readable NIfTI file"):
        load_case(_only_case(tmp_path), MODALITIES)


def test_shape_mismatch_names_the_file(tmp_path):
    folder = write_case(tmp_path, "brats2021", "BraTS2021_00001")
    path = folder / "BraTS2021_00001_t1ce.nii.gz"
    write_nifti(path, np.ones((6, 7, 4), np.float32), affine=AFFINE)
    with pytest.raises(DataError, match=rf"^{path}: shape \(6, 7, 4\) differs from \(6, 7, 5\)"):
        load_case(_only_case(tmp_path), MODALITIES)


def test_affine_mismatch_beyond_tolerance_names_the_file(tmp_path):
    folder = write_case(tmp_path, "brats2021", "BraTS2021_00001")
    path = folder / "BraTS2021_00001_seg.nii.gz"
    label = BRATS_2018_2021.from_canonical(canonical_label())
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.5
    write_nifti(path, label, affine=shifted, kind="label")
    with pytest.raises(DataError, match=rf"^{path}: affine differs .* by up to 0.5 mm"):
        load_case(_only_case(tmp_path), MODALITIES)
    # Rounding noise below the tolerance is accepted.
    shifted[0, 3] = AFFINE[0, 3] + 1e-5
    write_nifti(path, label, affine=shifted, kind="label")
    assert load_case(_only_case(tmp_path), MODALITIES).label is not None


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_voxels_name_the_file(tmp_path, bad_value):
    folder = write_case(tmp_path, "brats2021", "BraTS2021_00001")
    path = folder / "BraTS2021_00001_t2.nii.gz"
    image = read_nifti(path).data
    image[2, 2, 2] = bad_value
    write_nifti(path, image, affine=AFFINE)
    with pytest.raises(DataError, match=rf"^{path}: 1 voxels are NaN or Inf"):
        load_case(_only_case(tmp_path), MODALITIES)


def test_unexpected_label_values_name_the_file_and_the_convention(tmp_path):
    folder = write_case(tmp_path, "brats2021", "BraTS2021_00001")
    path = folder / "BraTS2021_00001_seg.nii.gz"
    label = np.zeros(SHAPE, np.uint8)
    label[1, 1, 1] = 3  # 3 is not a BraTS 2018-2021 label
    write_nifti(path, label, affine=AFFINE, kind="label")
    with pytest.raises(DataError) as error:
        load_case(_only_case(tmp_path), MODALITIES)
    assert str(error.value) == (
        f"{path}: unexpected label values 3; brats2018-2021 labels are [0, 1, 2, 4]"
    )


def test_fractional_labels_are_rejected(tmp_path):
    folder = write_case(tmp_path, "brats2023", "BraTS-GLI-00001-000")
    path = folder / "BraTS-GLI-00001-000-seg.nii.gz"
    write_nifti(path, np.full(SHAPE, 1.5, np.float32), affine=AFFINE)
    with pytest.raises(DataError, match=rf"^{path}: unexpected label values 1.5"):
        load_case(_only_case(tmp_path), MODALITIES)


def test_4d_volume_in_a_3d_layout_is_rejected(tmp_path):
    folder = write_case(tmp_path, "brats2021", "BraTS2021_00001")
    path = folder / "BraTS2021_00001_t1.nii.gz"
    write_nifti(path, np.ones((*SHAPE, 2), np.float32), affine=AFFINE)
    with pytest.raises(
        DataError, match=rf"^{path}: expected a 3D volume, got shape \(6, 7, 5, 2\)"
    ):
        load_case(_only_case(tmp_path), MODALITIES)


def test_msd_image_with_too_few_channels_is_rejected(tmp_path):
    write_case(tmp_path, "msd", "BRATS_001")
    path = tmp_path / "imagesTr" / "BRATS_001.nii.gz"
    write_nifti(path, np.ones((*SHAPE, 2), np.float32), affine=AFFINE)
    with pytest.raises(DataError, match=rf"^{path}: expected a 4D image with channel 2"):
        load_case(_only_case(tmp_path), MODALITIES)


def test_label_is_optional_for_prediction(tmp_path):
    write_case(tmp_path, "brats2020", "BraTS20_Validation_001", with_label=False)
    volumes = load_case(_only_case(tmp_path), MODALITIES)
    assert volumes.label is None
    assert volumes.image.shape == (*SHAPE, 4)
