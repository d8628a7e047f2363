import os

import numpy as np
import pytest

from tests.data.cases import canonical_label, write_case
from vi_seg_jax.data import cache
from vi_seg_jax.data.cache import prepare_case, prepare_dataset
from vi_seg_jax.data.conventions import MODALITIES
from vi_seg_jax.data.discovery import BadCaseWarning, discover_cases
from vi_seg_jax.data.preprocess import PreprocessConfig, to_original_grid
from vi_seg_jax.errors import DataError

CONFIG = PreprocessConfig(multiple=4)


@pytest.fixture
def count_loads(monkeypatch):
    calls = []
    real = cache.load_case

    def counting(case, modalities, **kwargs):
        calls.append(case.case_id)
        return real(case, modalities, **kwargs)

    monkeypatch.setattr(cache, "load_case", counting)
    return calls


def test_cached_case_maps_back_to_the_source_labels(tmp_path):
    write_case(tmp_path / "data", "brats2021", "BraTS2021_00001")
    case = discover_cases(tmp_path / "data").cases[0]
    prepared = prepare_case(case, tmp_path / "cache", modalities=MODALITIES, config=CONFIG)
    assert isinstance(prepared.image, np.memmap)
    assert all(s % 4 == 0 for s in prepared.image.shape[:3])
    np.testing.assert_array_equal(
        to_original_grid(np.asarray(prepared.label), prepared.mapping), canonical_label()
    )


def test_cache_is_reused_until_a_source_file_or_a_setting_changes(tmp_path, count_loads):
    folder = write_case(tmp_path / "data", "brats2021", "BraTS2021_00001")
    case = discover_cases(tmp_path / "data").cases[0]
    prepare_case(case, tmp_path / "cache", modalities=MODALITIES, config=CONFIG)
    prepare_case(case, tmp_path / "cache", modalities=MODALITIES, config=CONFIG)
    assert count_loads == ["BraTS2021_00001"]

    flair = folder / "BraTS2021_00001_flair.nii.gz"
    os.utime(flair, ns=(flair.stat().st_atime_ns, flair.stat().st_mtime_ns + 10**9))
    prepare_case(case, tmp_path / "cache", modalities=MODALITIES, config=CONFIG)
    assert len(count_loads) == 2

    prepare_case(
        case, tmp_path / "cache", modalities=MODALITIES, config=PreprocessConfig(multiple=8)
    )
    prepare_case(
        case, tmp_path / "cache", modalities=("flair",), config=PreprocessConfig(multiple=8)
    )
    assert len(count_loads) == 4


def test_interrupted_build_leaves_no_entry_and_keeps_the_old_one(tmp_path, monkeypatch):
    write_case(tmp_path / "data", "brats2021", "BraTS2021_00001")
    case = discover_cases(tmp_path / "data").cases[0]
    good = prepare_case(case, tmp_path / "cache", modalities=MODALITIES, config=CONFIG)
    saved = np.asarray(good.image).copy()

    def crash(path, array):
        raise OSError("disk full")

    monkeypatch.setattr(cache.np, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        prepare_case(
            case, tmp_path / "cache", modalities=MODALITIES, config=PreprocessConfig(multiple=8)
        )
    assert sorted(os.listdir(tmp_path / "cache")) == ["BraTS2021_00001"]
    monkeypatch.undo()
    again = prepare_case(case, tmp_path / "cache", modalities=MODALITIES, config=CONFIG)
    np.testing.assert_array_equal(np.asarray(again.image), saved)


def test_prepare_dataset_skips_bad_cases_when_asked(tmp_path):
    write_case(tmp_path / "data", "brats2021", "BraTS2021_00001")
    bad = write_case(tmp_path / "data", "brats2021", "BraTS2021_00002")
    (bad / "BraTS2021_00002_t2.nii.gz").write_bytes(b"garbage")
    dataset = discover_cases(tmp_path / "data")
    with pytest.raises(DataError, match=r"BraTS2021_00002_t2\.nii\.gz: not a readable NIfTI"):
        prepare_dataset(dataset, tmp_path / "cache", modalities=MODALITIES, config=CONFIG)
    with pytest.warns(BadCaseWarning, match=r"BraTS2021_00002_t2\.nii\.gz"):
        prepared = prepare_dataset(
            dataset, tmp_path / "cache", modalities=MODALITIES, config=CONFIG, skip_bad=True
        )
    assert [p.case_id for p in prepared] == ["BraTS2021_00001"]
