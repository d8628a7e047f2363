import numpy as np
import pytest

from vi_seg_jax.data.conventions import (
    BRATS_2018_2021,
    BRATS_2023,
    LAYOUTS,
    MSD_TASK01,
    canonical_modality,
    classes_from_regions,
    regions_from_classes,
)

# What each release's documentation says its labels mean.
RELEASE_MEANING = {
    "brats2018-2021": {0: "background", 1: "necrotic_core", 2: "edema", 4: "enhancing"},
    "brats2023": {
        0: "background",
        1: "necrotic_core",
        2: "edema",
        3: "enhancing",
        4: "resection_cavity",
    },
    "msd-task01": {0: "background", 1: "edema", 2: "necrotic_core", 3: "enhancing"},
}
CANONICAL = {"background": 0, "necrotic_core": 1, "edema": 2, "enhancing": 3, "resection_cavity": 4}


@pytest.mark.parametrize(
    "convention", [BRATS_2018_2021, BRATS_2023, MSD_TASK01], ids=lambda c: c.name
)
def test_release_labels_map_to_their_documented_meaning_and_back(convention):
    meaning = RELEASE_MEANING[convention.name]
    release = np.array(sorted(meaning))
    np.testing.assert_array_equal(
        convention.to_canonical(release), [CANONICAL[meaning[v]] for v in release]
    )
    np.testing.assert_array_equal(
        convention.from_canonical(convention.to_canonical(release)), release
    )


def test_regions_follow_brats_definitions_in_every_release():
    # WT = necrotic + edema + enhancing, TC = necrotic + enhancing, ET = enhancing.
    expected = {"background": (0, 0, 0), "necrotic_core": (1, 1, 0), "edema": (1, 0, 0),
                "enhancing": (1, 1, 1), "resection_cavity": (0, 0, 0)}  # fmt: skip
    for convention in (BRATS_2018_2021, BRATS_2023, MSD_TASK01):
        for value, name in RELEASE_MEANING[convention.name].items():
            regions = regions_from_classes(convention.to_canonical(np.array([value])))[0]
            assert tuple(regions.astype(int)) == expected[name], (convention.name, value)


def test_regions_decode_back_to_classes():
    classes = np.array([0, 1, 2, 3, 0, 2])
    np.testing.assert_array_equal(classes_from_regions(regions_from_classes(classes)), classes)
    # A TC voxel that the WT output missed is still tumour core.
    assert classes_from_regions(np.array([[0, 1, 0]], bool))[0] == 1


def test_unknown_labels_are_reported():
    with pytest.raises(ValueError, match=r"unexpected label values \[3\]"):
        BRATS_2018_2021.to_canonical(np.array([0, 3]))
    with pytest.raises(ValueError, match="msd-task01 has no label for canonical classes"):
        MSD_TASK01.from_canonical(np.array([4]))


def test_modality_aliases():
    assert [canonical_modality(n) for n in ("t1n", "T1c", "t2w", "t2f", "FLAIR", "T1Gd")] == [
        "t1", "t1ce", "t2", "flair", "flair", "t1ce"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="unknown modality 'dwi'"):
        canonical_modality("dwi")
    for layout in LAYOUTS.values():
        assert set(layout.modality_suffixes) == {"t1", "t1ce", "t2", "flair"}
