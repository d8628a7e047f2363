import numpy as np
import pytest

from tests.data.cases import CASE_IDS, write_case
from vi_seg_jax.data.discovery import BadCaseWarning, discover_cases
from vi_seg_jax.errors import DataError


def test_every_layout_is_recognised(layout_dataset):
    layout_name, root = layout_dataset
    dataset = discover_cases(root, require_labels=True)
    assert dataset.layout.name == layout_name
    assert [c.case_id for c in dataset.cases] == sorted(
        c.split("/")[-1] for c in CASE_IDS[layout_name]
    )
    assert dataset.num_labelled == 3
    assert layout_name in dataset.summary()
    for case in dataset.cases:
        assert set(case.images) == {"t1", "t1ce", "t2", "flair"}
        assert all(path.is_file() for path in case.images.values())
        assert case.label.is_file()


def test_msd_channels_follow_the_decathlon_order(tmp_path):
    write_case(tmp_path, "msd", "BRATS_007")
    case = discover_cases(tmp_path).cases[0]
    assert {m: case.channel_index(m) for m in case.images} == {
        "flair": 0,
        "t1": 1,
        "t1ce": 2,
        "t2": 3,
    }


def test_brats2023_aliases_map_to_canonical_modalities(tmp_path):
    write_case(tmp_path, "brats2023", "BraTS-GLI-00005-000")
    case = discover_cases(tmp_path).cases[0]
    assert case.images["flair"].name == "BraTS-GLI-00005-000-t2f.nii.gz"
    assert case.images["t1ce"].name == "BraTS-GLI-00005-000-t1c.nii.gz"


def test_a_single_case_folder_is_a_dataset_of_one(tmp_path):
    folder = write_case(tmp_path, "brats2021", "BraTS2021_00042")
    dataset = discover_cases(folder)
    assert [c.case_id for c in dataset.cases] == ["BraTS2021_00042"]


def test_uncompressed_nii_files_are_found(tmp_path):
    folder = write_case(tmp_path, "brats2020", "BraTS20_Training_010")
    for path in folder.iterdir():
        path.rename(path.with_name(path.name.replace(".nii.gz", ".nii")))
    case = discover_cases(tmp_path, require_labels=True).cases[0]
    assert case.label.name == "BraTS20_Training_010_seg.nii"


def test_brats2020_oddly_named_segmentation_is_accepted(tmp_path):
    folder = write_case(tmp_path, "brats2020", "BraTS20_Training_355")
    (folder / "BraTS20_Training_355_seg.nii.gz").rename(folder / "W39_1998.09.19_Segm.nii.gz")
    case = discover_cases(tmp_path, require_labels=True).cases[0]
    assert case.label.name == "W39_1998.09.19_Segm.nii.gz"


def test_inference_only_cases_are_valid_for_prediction(tmp_path):
    write_case(tmp_path, "brats2021", "BraTS2021_00001", with_label=False)
    dataset = discover_cases(tmp_path)
    assert dataset.cases[0].label is None
    with pytest.raises(DataError, match=r"BraTS2021_00001: missing segmentation .*_seg\.nii\.gz"):
        discover_cases(tmp_path, require_labels=True)


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match=rf"^{tmp_path}: empty folder"):
        discover_cases(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="nowhere: folder not found"):
        discover_cases(tmp_path / "nowhere")


def test_unrecognisable_layout(tmp_path):
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "brain.nii.gz").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=rf"^{tmp_path}: no recognisable BraTS layout"):
        discover_cases(tmp_path)


def test_missing_modality_names_the_case_and_expected_file(tmp_path):
    folder = write_case(tmp_path, "brats2021", "BraTS2021_00009")
    (folder / "BraTS2021_00009_flair.nii.gz").unlink()
    with pytest.raises(DataError) as error:
        discover_cases(tmp_path)
    assert str(error.value) == (
        f"{folder}: missing modality 'flair' (expected BraTS2021_00009_flair.nii.gz)"
    )
    # Asking only for the modalities that are there is fine.
    assert len(discover_cases(tmp_path, modalities=("t1", "t2"))) == 1


def test_skip_bad_warns_and_keeps_the_good_cases(tmp_path):
    write_case(tmp_path, "brats2021", "BraTS2021_00001")
    bad = write_case(tmp_path, "brats2021", "BraTS2021_00002")
    (bad / "BraTS2021_00002_t1ce.nii.gz").unlink()
    with pytest.warns(BadCaseWarning, match="BraTS2021_00002: missing modality 't1ce'"):
        dataset = discover_cases(tmp_path, skip_bad=True)
    assert [c.case_id for c in dataset.cases] == ["BraTS2021_00001"]
    assert len(dataset.skipped) == 1


def test_misnamed_case_folder_is_an_error_not_silently_dropped(tmp_path):
    write_case(tmp_path, "brats2021", "BraTS2021_00001")
    stray = tmp_path / "patient_7"
    stray.mkdir()
    (stray / "t1.nii.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"patient_7: NIfTI files not named patient_7_<modality>"):
        discover_cases(tmp_path)


def test_mixed_layouts_are_refused(tmp_path):
    write_case(tmp_path, "brats2021", "BraTS2021_00001")
    write_case(tmp_path, "brats2023", "BraTS-GLI-00001-000")
    with pytest.raises(
        DataError, match=r"mixed layouts brats2021 \(1 cases\), brats2023 \(1 cases\)"
    ):
        discover_cases(tmp_path)


def test_hidden_and_macos_resource_files_are_ignored(tmp_path):
    write_case(tmp_path, "msd", "BRATS_001")
    (tmp_path / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    dataset = discover_cases(tmp_path)
    assert [c.case_id for c in dataset.cases] == ["BRATS_001"]
    assert np.all([p.name == "BRATS_001.nii.gz" for p in dataset.cases[0].images.values()])


@pytest.mark.parametrize("layout", ["brats2018", "brats2020", "brats2021", "brats2023", "msd"])
def test_synthetic_data_of_every_layout_is_discovered_and_valid(tmp_path, layout):
    from vi_seg_jax.data.conventions import MODALITIES
    from vi_seg_jax.data.loading import load_case
    from vi_seg_jax.data.synthetic import write_dataset

    write_dataset(tmp_path / layout, num_cases=4, layout=layout, shape=(32, 32, 24), seed=3)
    dataset = discover_cases(tmp_path / layout, require_labels=True)
    assert dataset.layout.name == layout
    assert len(dataset) == 4
    for case in dataset.cases:
        volumes = load_case(case, MODALITIES)
        assert volumes.image.shape == (32, 32, 24, 4)
        assert set(np.unique(volumes.label)) <= {0, 1, 2, 3}
        assert (volumes.label > 0).any()
