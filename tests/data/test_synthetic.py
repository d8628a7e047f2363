"""Tests of the synthetic BraTS-like generator and its command-line entry point."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from vi_seg_jax.data.conventions import LAYOUTS, MODALITIES
from vi_seg_jax.data.synthetic import SyntheticConfig, generate_case, write_dataset
from vi_seg_jax.data.synthetic import writing as synthetic
from vi_seg_jax.errors import DataError

REPO = Path(__file__).resolve().parents[2]
SHAPE = (48, 48, 32)
SEED = 3
NUM_CASES = 4

# Release label values, written out here rather than taken from conventions.py.
RELEASE_LABELS = {
    "brats2018": {0, 1, 2, 4},
    "brats2020": {0, 1, 2, 4},
    "brats2021": {0, 1, 2, 4},
    "brats2023": {0, 1, 2, 3},
    "msd": {0, 1, 2, 3},
}
ENHANCING_VALUE = {"brats2018": 4, "brats2020": 4, "brats2021": 4, "brats2023": 3, "msd": 3}


def _expected_files(layout: str, index: int) -> set[str]:
    if layout == "msd":
        return {f"imagesTr/BRATS_{index + 1:03d}.nii.gz", f"labelsTr/BRATS_{index + 1:03d}.nii.gz"}
    if layout == "brats2023":
        case = f"BraTS-GLI-{index:05d}-000"
        return {f"{case}/{case}-{s}.nii.gz" for s in ("t1n", "t1c", "t2w", "t2f", "seg")}
    case, folder = {
        "brats2018": (f"Brats18_SYN_{index + 1:04d}_1", "HGG/" if index % 4 != 3 else "LGG/"),
        "brats2020": (f"BraTS20_Training_{index + 1:03d}", ""),
        "brats2021": (f"BraTS2021_{index:05d}", ""),
    }[layout]
    return {f"{folder}{case}/{case}_{s}.nii.gz" for s in ("t1", "t1ce", "t2", "flair", "seg")}


@pytest.fixture(scope="module")
def tumour_cases():
    config = SyntheticConfig(shape=SHAPE, seed=SEED)
    return [generate_case(config, i) for i in range(NUM_CASES)]


@pytest.fixture(scope="module")
def lesion_cases():
    config = SyntheticConfig(shape=SHAPE, domain="lesions", seed=SEED)
    return [generate_case(config, i) for i in range(NUM_CASES)]


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def written(request, tmp_path_factory):
    layout = request.param
    root = tmp_path_factory.mktemp(layout) / "data"
    ids = write_dataset(root, num_cases=NUM_CASES, layout=layout, shape=SHAPE, seed=SEED)
    return layout, root, ids


# --------------------------------------------------------------------------------------------
# Layouts on disk


def test_layout_has_exactly_the_release_file_names(written):
    layout, root, ids = written
    expected = set().union(*(_expected_files(layout, i) for i in range(NUM_CASES)))
    if layout == "msd":
        expected.add("dataset.json")
    found = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert found == expected
    assert len(ids) == NUM_CASES and len(set(ids)) == NUM_CASES
    assert not [p.name for p in root.parent.iterdir() if p.name.startswith(".")]


def test_every_file_opens_with_matching_geometry(written):
    layout, root, _ = written
    for index in range(NUM_CASES):
        images = [nib.load(root / f) for f in sorted(_expected_files(layout, index))]
        reference = images[0].affine
        for image in images:
            assert image.shape[:3] == SHAPE
            assert image.shape[3:] in ((), (4,))
            np.testing.assert_array_equal(image.affine, reference)
            np.testing.assert_allclose(image.header.get_zooms()[:3], (5.0, 5.0, 155 / 32), 1e-5)
            assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
            assert np.isfinite(np.asarray(image.dataobj)).all()


def test_labels_use_the_release_values_and_round_trip(written, tumour_cases):
    layout, root, _ = written
    convention = LAYOUTS[layout].convention
    seen = set()
    for index, case in enumerate(tumour_cases):
        (label_file,) = [f for f in _expected_files(layout, index) if "seg" in f or "labels" in f]
        values = np.asarray(nib.load(root / label_file).dataobj)
        assert values.dtype == np.uint8
        assert set(np.unique(values).tolist()) <= RELEASE_LABELS[layout]
        seen |= set(np.unique(values).tolist())
        np.testing.assert_array_equal(convention.to_canonical(values), case.label)
    assert ENHANCING_VALUE[layout] in seen  # the conversion really happened


def test_msd_image_channels_and_dataset_json(tumour_cases, tmp_path):
    root = tmp_path / "msd"
    write_dataset(root, num_cases=2, layout="msd", shape=SHAPE, seed=SEED)
    image = np.asarray(nib.load(root / "imagesTr/BRATS_002.nii.gz").dataobj)
    for channel, modality in enumerate(("flair", "t1", "t1ce", "t2")):
        np.testing.assert_array_equal(image[..., channel], tumour_cases[1].images[modality])
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    assert meta["labels"]["1"] == "edema" and meta["labels"]["3"].startswith("enhancing")
    assert meta["numTraining"] == 2
    assert meta["training"][1] == {
        "image": "./imagesTr/BRATS_002.nii.gz",
        "label": "./labelsTr/BRATS_002.nii.gz",
    }
    for entry in meta["training"]:
        assert (root / entry["image"]).is_file() and (root / entry["label"]).is_file()


# --------------------------------------------------------------------------------------------
# Write safety


def test_refuses_a_non_empty_destination_and_overwrites_on_request(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    write_dataset(out, num_cases=1, shape=(32, 32, 24))  # an empty folder is fine
    with pytest.raises(DataError, match="not empty"):
        write_dataset(out, num_cases=1, shape=(32, 32, 24))
    (out / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="not empty"):
        write_dataset(out, num_cases=1, shape=(32, 32, 24))
    assert (out / "keep.txt").exists()
    write_dataset(out, num_cases=1, shape=(32, 32, 24), overwrite=True, progress=True)
    assert not (out / "keep.txt").exists()
    assert "BraTS2021_00000" in capsys.readouterr().err  # progress=True prints to stderr
    assert (out / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_interrupted_run_leaves_nothing_under_the_final_name(tmp_path, monkeypatch):
    calls = []

    def failing_write_case(root, case, layout):
        calls.append(case.index)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(root, case, layout)

    original = synthetic.write_case
    monkeypatch.setattr(synthetic, "write_case", failing_write_case)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(tmp_path / "out", num_cases=3, shape=(32, 32, 24))
    assert calls == [0, 1]
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Content


def _region_fractions(case):
    brain = case.brain_mask.sum()
    wt = np.isin(case.label, (1, 2, 3))
    tc = np.isin(case.label, (1, 3))
    et = case.label == 3
    return wt, tc, et, wt.sum() / brain


def test_tumour_regions_are_present_plausible_and_nested(tumour_cases):
    for case in tumour_cases:
        wt, tc, et, wt_fraction = _region_fractions(case)
        assert case.label.dtype == np.uint8 and set(np.unique(case.label)) <= {0, 1, 2, 3}
        assert 0.005 <= wt_fraction <= 0.15, (case.index, wt_fraction)
        assert tc.sum() > 0 and (wt & ~tc).sum() > 0  # a core and edema around it
        assert not (et & ~tc).any() and not (tc & ~wt).any()
        assert not (wt & ~case.brain_mask).any()
        if case.grade == "HGG":
            assert et.sum() > 0
        # The core is wrapped in tumour: the shell just outside it is mostly labelled tumour.
        shell = ndimage.binary_dilation(tc, iterations=1) & ~tc & case.brain_mask
        assert (wt[shell]).mean() > 0.6
    assert [c.grade for c in tumour_cases] == ["HGG", "HGG", "HGG", "LGG"]


def test_edema_margin_labels_are_ambiguous(tumour_cases):
    for case in tumour_cases:
        wt = case.label > 0
        soft = case.tumour_probability > 0.5
        disagreement = (wt ^ soft).sum() / wt.sum()
        assert 0.005 < disagreement < 0.5, (case.index, disagreement)
        margin = (case.tumour_probability > 0.1) & (case.tumour_probability < 0.9)
        assert margin.sum() > 0.2 * wt.sum()  # a real fuzzy band, not a step


def _tissue_mask(case, tissue):
    return (case.tissue_fractions[tissue] > 0.7) & (case.label == 0)


def test_tissue_contrasts_follow_mri(tumour_cases):
    for case in tumour_cases:
        wm, gm, csf = (_tissue_mask(case, t) for t in ("wm", "gm", "csf"))
        assert min(wm.sum(), gm.sum(), csf.sum()) >= 10

        def mean(modality, mask, case=case):
            return case.images[modality][mask].mean()

        assert mean("t1", wm) > mean("t1", gm) > mean("t1", csf)
        assert mean("t2", csf) > mean("t2", gm) > mean("t2", wm)
        assert mean("flair", gm) > mean("flair", wm) > mean("flair", csf)
        assert mean("flair", case.label == 2) > 1.2 * mean("flair", wm)
        assert mean("t2", case.label == 2) > mean("t2", wm)
        if (case.label == 3).sum() >= 5:
            assert mean("t1ce", case.label == 3) > 1.2 * mean("t1ce", wm)
            assert mean("t1", case.label == 3) < mean("t1", wm)


def test_images_are_skull_stripped_noisy_and_float32(tumour_cases):
    for case in tumour_cases:
        assert set(case.images) == set(MODALITIES)
        for image in case.images.values():
            assert image.dtype == np.float32 and image.shape == SHAPE
            assert (image[~case.brain_mask] == 0).all()
            assert (image[case.brain_mask] > 0).mean() > 0.99
        wm = _tissue_mask(case, "wm")
        t1 = case.images["t1"][wm]
        assert 0.01 < t1.std() / t1.mean() < 0.4  # noise and bias, but tissue still readable


def test_scale_differs_between_cases_and_modalities(tumour_cases):
    wm_means = np.array(
        [[c.images[m][_tissue_mask(c, "wm")].mean() for m in MODALITIES] for c in tumour_cases]
    )
    ratio = wm_means[0] / wm_means[1]
    assert np.ptp(ratio) > 0.05  # per-modality gain, not one factor per case


def test_cases_differ_in_brain_shape(tumour_cases):
    masks = [c.brain_mask for c in tumour_cases]
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            dice = 2 * (masks[i] & masks[j]).sum() / (masks[i].sum() + masks[j].sum())
            assert 0.6 < dice < 0.97, (i, j, dice)


def test_same_seed_is_byte_identical_and_order_free(tumour_cases):
    config = SyntheticConfig(shape=SHAPE, seed=SEED)
    again = generate_case(config, 2)
    reference = tumour_cases[2]
    assert again.label.tobytes() == reference.label.tobytes()
    for modality in MODALITIES:
        assert again.images[modality].tobytes() == reference.images[modality].tobytes()
    other = generate_case(SyntheticConfig(shape=SHAPE, seed=SEED + 1), 2)
    assert not np.array_equal(other.images["t1"], reference.images["t1"])


def test_anatomy_does_not_depend_on_the_grid(tumour_cases):
    fine = generate_case(SyntheticConfig(shape=(64, 64, 40), seed=SEED), 0)
    coarse = tumour_cases[0]

    def centroid(case):
        voxels = np.argwhere(case.label > 0).mean(axis=0)
        return case.affine[:3, :3] @ voxels + case.affine[:3, 3]

    assert np.linalg.norm(centroid(fine) - centroid(coarse)) < 6.0  # mm
    volume = [c.brain_mask.sum() * abs(np.linalg.det(c.affine[:3, :3])) for c in (fine, coarse)]
    assert abs(volume[0] - volume[1]) / volume[1] < 0.05


def test_lesion_domain_has_several_lesions_and_no_enhancement(lesion_cases):
    for case in lesion_cases:
        assert case.grade is None
        assert not (case.label == 3).any()
        assert (case.label == 2).sum() > 0
        assert ndimage.label(case.label > 0)[1] >= 2
        assert (case.label > 0).sum() < 0.05 * case.brain_mask.sum()
        wm = _tissue_mask(case, "wm")
        lesion = case.label > 0
        assert case.images["flair"][lesion].mean() > 1.2 * case.images["flair"][wm].mean()
    # Lesion and tumour datasets are different patients even with the same seed.
    assert not np.array_equal(lesion_cases[0].brain_mask, generate_case(SyntheticConfig(
        shape=SHAPE, seed=SEED), 0).brain_mask)  # fmt: skip


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="shape"):
        SyntheticConfig(shape=(8, 64, 64))
    with pytest.raises(ValueError, match="seed"):
        SyntheticConfig(seed=-1)
    with pytest.raises(ValueError, match="domain"):
        SyntheticConfig(domain="tumor")
    with pytest.raises(ValueError, match="layout"):
        write_dataset("unused", num_cases=1, layout="brats2019")
    with pytest.raises(ValueError, match="index"):
        generate_case(SyntheticConfig(), -1)


# --------------------------------------------------------------------------------------------
# Command line


def _run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.make_data", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_writes_then_refuses_a_non_empty_folder(tmp_path):
    out = tmp_path / "d"
    first = _run_cli("--out", str(out), "--cases", "2", "--shape", "32", "32", "24")
    assert first.returncode == 0, first.stderr
    lines = first.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("wrote 2 tumour cases")
    assert (out / "BraTS2021_00001" / "BraTS2021_00001_flair.nii.gz").is_file()
    assert nib.load(out / "BraTS2021_00001" / "BraTS2021_00001_seg.nii.gz").shape == (32, 32, 24)

    second = _run_cli("--out", str(out), "--cases", "2", "--shape", "32", "32", "24")
    assert second.returncode == 2
    assert len(second.stderr.strip().splitlines()) == 1
    assert "not empty" in second.stderr and "Traceback" not in second.stderr


def test_cli_rejects_bad_flags(capsys):
    from experiments import make_data

    for argv in (["--out", "x", "--cases", "1", "--layout", "brats2019"],
                 ["--out", "x", "--cases", "0"],
                 ["--out", "x", "--cases", "1", "--seed", "-3"],
                 ["--out", "x", "--cases", "1", "--shape", "8", "8", "8"],
                 ["--cases", "1"]):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            make_data.main(argv)
        assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err
