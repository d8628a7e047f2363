"""Tests of the graded distribution shift of the synthetic generator (`--shift KIND:LEVEL`)."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from vi_seg_jax.data.conventions import MODALITIES
from vi_seg_jax.data.synthetic import (
    ANATOMY_MODES,
    Shift,
    SyntheticConfig,
    anatomy_mode,
    generate_case,
    write_dataset,
)
from vi_seg_jax.data.synthetic.contrast import thick_slices

REPO = Path(__file__).resolve().parents[2]
SHAPE = (48, 48, 32)
SEED = 3
INDICES = (0, 1, 2, 3)  # HGG, HGG, HGG, LGG; anatomy modes small, large, multifocal, location
LEVELS = (0, 1, 2, 3)


def _generate(shift=None, index=0, shape=SHAPE, domain="tumour", **kwargs):
    config = SyntheticConfig(shape=shape, seed=SEED, domain=domain, shift=shift, **kwargs)
    return generate_case(config, index)


def _arrays(case):
    """Every array of a case, named."""
    named = {"label": case.label, "brain_mask": case.brain_mask}
    named["tumour_probability"] = case.tumour_probability
    named.update({f"image_{m}": case.images[m] for m in MODALITIES})
    named.update({f"fraction_{t}": case.tissue_fractions[t] for t in case.tissue_fractions})
    return named


def _assert_bitwise_equal(a, b):
    arrays_a, arrays_b = _arrays(a), _arrays(b)
    assert arrays_a.keys() == arrays_b.keys()
    for name, array in arrays_a.items():
        assert array.dtype == arrays_b[name].dtype, name
        assert array.tobytes() == arrays_b[name].tobytes(), name
    np.testing.assert_array_equal(a.affine, b.affine)
    assert (a.index, a.grade) == (b.index, b.grade)


@pytest.fixture(scope="module")
def base():
    return {i: _generate(None, i) for i in INDICES}


@pytest.fixture(scope="module")
def shifted():
    """(kind, level) -> {index: case}, levels 1-3 (level 0 is `base`)."""
    return {
        (kind, level): {i: _generate(Shift(kind, level), i) for i in INDICES}
        for kind in ("scanner", "contrast", "anatomy")
        for level in LEVELS[1:]
    }


def _levels(base, shifted, kind, index):
    return [base[index]] + [shifted[(kind, level)][index] for level in LEVELS[1:]]


def _normal_wm(case):
    """Eroded normal white matter: the reference tissue for noise and contrast."""
    wm = (case.tissue_fractions["wm"] > 0.7) & (case.label == 0)
    return ndimage.binary_erosion(wm)


def _noise(case, modality):
    """High-pass residual std in normal white matter, relative to its mean intensity."""
    image = case.images[modality]
    residual = image - ndimage.uniform_filter(image, 3)
    wm = _normal_wm(case)
    return residual[wm].std() / image[wm].mean()


def _ratio(case, modality, region):
    return case.images[modality][region].mean() / case.images[modality][_normal_wm(case)].mean()


# --------------------------------------------------------------------------------------------
# Level 0 and what each kind leaves alone


@pytest.mark.parametrize("kind", ["scanner", "contrast", "anatomy"])
def test_level_0_is_todays_data_bitwise(kind, base):
    for index in (0, 3):
        _assert_bitwise_equal(_generate(Shift(kind, 0), index), base[index])
    _assert_bitwise_equal(
        _generate(f"{kind}:0", 2, mass_effect=False), _generate(None, 2, mass_effect=False)
    )
    if kind != "anatomy":
        lesions = _generate(Shift(kind, 0), 1, domain="lesions")
        _assert_bitwise_equal(lesions, _generate(None, 1, domain="lesions"))


@pytest.mark.parametrize("kind", ["scanner", "contrast"])
def test_scanner_and_contrast_keep_labels_and_anatomy_bitwise(kind, base, shifted):
    for level in LEVELS[1:]:
        for index in INDICES:
            case, reference = shifted[(kind, level)][index], base[index]
            for name in ("label", "brain_mask", "tumour_probability"):
                assert getattr(case, name).tobytes() == getattr(reference, name).tobytes()
            for tissue, fraction in case.tissue_fractions.items():
                assert fraction.tobytes() == reference.tissue_fractions[tissue].tobytes()
            changed = [
                m for m in MODALITIES if not np.array_equal(case.images[m], reference.images[m])
            ]
            if kind == "scanner":
                assert changed == list(MODALITIES)
            else:  # T1 keeps its means, draws and noise; T1ce changes where tumour enhances
                expected = (
                    ["t1ce", "t2", "flair"] if (reference.label == 3).any() else ["t2", "flair"]
                )
                assert changed == expected
            for image in case.images.values():
                assert image.dtype == np.float32 and np.isfinite(image).all()
                assert (image[~case.brain_mask] == 0).all()
                assert (image[case.brain_mask] > 0).mean() > 0.99


# --------------------------------------------------------------------------------------------
# Scanner


def test_scanner_noise_grows_with_level(base, shifted):
    for modality in MODALITIES:
        noise = [
            np.mean(
                [
                    _noise(c, modality)
                    for c in (_levels(base, shifted, "scanner", i)[lv] for i in INDICES)
                ]
            )
            for lv in LEVELS
        ]
        assert np.all(np.diff(noise) > 0), (modality, noise)
        assert noise[3] > 1.5 * noise[0], (modality, noise)


def test_thick_slices_blur_through_plane_only():
    volume = np.zeros((4, 5, 40), np.float32)
    volume[..., 20:] = 1.0
    np.testing.assert_allclose(thick_slices(np.ones_like(volume), 1.0, 6.0, 0.3), 1.0, atol=1e-6)
    widths = []
    for thickness in (3.0, 6.0, 10.0):
        out = thick_slices(volume, 1.0, thickness, 0.3)
        assert out.shape == volume.shape and out.dtype == np.float32
        np.testing.assert_array_equal(
            out, np.broadcast_to(out[:1, :1], out.shape)
        )  # in-plane: none
        profile = out[0, 0]
        assert profile[0] == pytest.approx(0, abs=1e-3) and profile[-1] == pytest.approx(
            1, abs=1e-3
        )
        widths.append(int(((profile > 0.05) & (profile < 0.95)).sum()))
    assert widths[0] < widths[1] < widths[2], widths


# --------------------------------------------------------------------------------------------
# Contrast


def test_contrast_weakens_enhancement_and_lesion_contrast(base, shifted):
    enhancing = [i for i in INDICES if (base[i].label == 3).sum() >= 5]
    assert len(enhancing) >= 2
    t1ce = [
        np.mean(
            [
                _ratio(_levels(base, shifted, "contrast", i)[lv], "t1ce", base[i].label == 3)
                for i in enhancing
            ]
        )
        for lv in LEVELS
    ]
    assert np.all(np.diff(t1ce) < 0), t1ce
    assert t1ce[0] > 1.2 and t1ce[3] < 1.0, t1ce  # level 3: no enhancement at all
    for modality in ("flair", "t2"):
        edema = [
            np.mean(
                [
                    _ratio(_levels(base, shifted, "contrast", i)[lv], modality, base[i].label == 2)
                    for i in INDICES
                ]
            )
            for lv in LEVELS
        ]
        assert np.all(np.diff(edema) < 0), (modality, edema)
        assert edema[3] - 1 < 0.5 * (edema[0] - 1), (modality, edema)


def test_shifts_apply_to_the_lesion_domain():
    reference = _generate(None, 0, domain="lesions")
    lesion = reference.label > 0
    flair = []
    for level in LEVELS:
        case = _generate(Shift("contrast", level), 0, domain="lesions")
        assert case.label.tobytes() == reference.label.tobytes()
        flair.append(_ratio(case, "flair", lesion))
    assert np.all(np.diff(flair) < 0), flair
    scanner = _generate(Shift("scanner", 3), 0, domain="lesions")
    assert scanner.label.tobytes() == reference.label.tobytes()
    assert _noise(scanner, "flair") > 2 * _noise(reference, "flair")
    with pytest.raises(ValueError, match="anatomy shift needs domain 'tumour'"):
        SyntheticConfig(domain="lesions", shift="anatomy:1")


# --------------------------------------------------------------------------------------------
# Anatomy


def _mode_index(mode):
    (index,) = [i for i in INDICES if anatomy_mode(i) == mode]
    return index


def test_anatomy_modes_cycle_with_the_index():
    assert [anatomy_mode(i) for i in range(8)] == [
        *ANATOMY_MODES,
        *ANATOMY_MODES[1:],
        ANATOMY_MODES[0],
    ]
    for start in range(0, 40, 4):
        assert sorted(anatomy_mode(i) for i in range(start, start + 4)) == sorted(ANATOMY_MODES)
    lgg_modes = {anatomy_mode(i) for i in range(3, 64, 4)}
    assert lgg_modes == set(ANATOMY_MODES)


def _volumes(cases):
    return np.array([(c.label > 0).sum() for c in cases])


def test_anatomy_small_and_large_leave_the_level_0_size_range(base, shifted):
    level0 = _volumes(base.values())
    small = _volumes(_levels(base, shifted, "anatomy", _mode_index("small")))
    large = _volumes(_levels(base, shifted, "anatomy", _mode_index("large")))
    assert np.all(np.diff(small) < 0) and np.all(np.diff(large) > 0), (small, large)
    assert small[3] < 0.5 * level0.min() and small[3] > 0, (small, level0)
    assert large[3] > 1.2 * level0.max(), (large, level0)


def _components(mask, min_voxels=1):
    labelled, _ = ndimage.label(mask)
    sizes = np.bincount(labelled.ravel())[1:]
    return int((sizes >= min_voxels).sum())


def test_anatomy_multifocal_has_level_plus_one_foci(base, shifted):
    index = _mode_index("multifocal")
    for level, case in enumerate(_levels(base, shifted, "anatomy", index)):
        core = np.isin(case.label, (1, 3))
        if level == 0:
            assert _components(core) == 1
        else:
            assert _components(core) >= level + 1, level
            assert _components(case.label > 0, min_voxels=5) >= level + 1, level


def _core_centroid_and_depth(case):
    core = np.isin(case.label, (1, 3))
    core = core if core.any() else case.label > 0
    spacing = np.diag(case.affine)[:3]
    inside = ndimage.distance_transform_edt(case.brain_mask, sampling=spacing)
    centroid = case.affine[:3, :3] @ np.argwhere(core).mean(axis=0) + case.affine[:3, 3]
    return centroid, float(np.median(inside[core]))


def test_anatomy_location_moves_the_tumour_as_documented(base, shifted):
    index = _mode_index("location")
    cases = _levels(base, shifted, "anatomy", index)
    depth0 = min(_core_centroid_and_depth(c)[1] for c in base.values())
    centroid, depth = _core_centroid_and_depth(cases[1])
    assert depth < 16 and depth < depth0, (depth, depth0)  # juxtacortical
    for level in (2, 3):  # infratentorial: posterior fossa, below the usual sites
        centroid, _ = _core_centroid_and_depth(cases[level])
        assert centroid[2] < -10 and centroid[1] < -15, (level, centroid)
        assert centroid[2] < min(_core_centroid_and_depth(c)[0][2] for c in base.values())


def test_anatomy_shift_keeps_the_brain(shifted):
    reference = _generate(None, 2, mass_effect=False)
    for level in LEVELS[1:]:
        case = _generate(Shift("anatomy", level), 2, mass_effect=False)
        assert case.brain_mask.tobytes() == reference.brain_mask.tobytes()
        assert not np.array_equal(case.label, reference.label)
        normal = (case.label == 0) & (reference.label == 0) & (case.tumour_probability < 1e-3)
        normal &= reference.tumour_probability < 1e-3
        # Same noise draws: far from any tumour the T1 images agree up to the rendering.
        assert np.corrcoef(case.images["t1"][normal], reference.images["t1"][normal])[0, 1] > 0.99


# --------------------------------------------------------------------------------------------
# Parsing and configuration


def test_shift_parses_kind_level_and_prints_back():
    assert Shift.parse("scanner:2") == Shift("scanner", 2)
    assert Shift.parse(" Contrast:0 ") == Shift("contrast", 0)
    assert str(Shift("anatomy", 3)) == "anatomy:3"
    assert not Shift("anatomy", 0).active and Shift("anatomy", 1).active
    assert SyntheticConfig(shift="scanner:1").shift == Shift("scanner", 1)
    assert SyntheticConfig().shift is None


@pytest.mark.parametrize(
    "text",
    ["scanner", "scanner:4", "scaner:1", "scanner:-1", "scanner:x", "", ":1", "scanner:1:2",
     "scanner:1.5"],
)  # fmt: skip
def test_bad_shift_strings_give_one_line_errors(text):
    with pytest.raises(ValueError) as error:
        Shift.parse(text)
    message = str(error.value)
    assert "\n" not in message and "shift" in message, message


def test_bad_shift_values_raise():
    for kind, level in (("scanner", 1.5), ("scanner", True), ("noise", 1), ("contrast", 4)):
        with pytest.raises(ValueError, match="shift"):
            Shift(kind, level)
    with pytest.raises(ValueError, match="shift"):
        SyntheticConfig(shift=("scanner", 1))


# --------------------------------------------------------------------------------------------
# Writing and the command line


def _run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.make_data", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _files(root):
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_cli_writes_the_same_layout_with_the_same_labels(tmp_path):
    small = ("--cases", "2", "--shape", "32", "32", "24")
    plain, shifted = tmp_path / "plain", tmp_path / "shifted"
    write_dataset(plain, num_cases=2, shape=(32, 32, 24))
    result = _run_cli("--out", str(shifted), *small, "--shift", "contrast:2")
    assert result.returncode == 0, result.stderr
    assert (
        result.stdout.strip()
        .splitlines()[-1]
        .startswith("wrote 2 tumour cases (brats2021 layout, 32x32x24, shift contrast:2)")
    )
    assert _files(shifted) == _files(plain)
    for name in _files(plain):
        a, b = (np.asarray(nib.load(root / name).dataobj) for root in (plain, shifted))
        if name.endswith(("_seg.nii.gz", "_t1.nii.gz")):
            np.testing.assert_array_equal(a, b)
        else:
            assert not np.array_equal(a, b), name


def test_msd_dataset_json_records_a_shift(tmp_path):
    kwargs = {"num_cases": 1, "layout": "msd", "shape": (32, 32, 24)}
    write_dataset(tmp_path / "plain", **kwargs)
    write_dataset(tmp_path / "level0", shift="scanner:0", **kwargs)
    write_dataset(tmp_path / "level2", shift=Shift("scanner", 2), **kwargs)
    plain = (tmp_path / "plain" / "dataset.json").read_bytes()
    assert (tmp_path / "level0" / "dataset.json").read_bytes() == plain
    for name in _files(tmp_path / "plain"):
        level0 = (tmp_path / "level0" / name).read_bytes()
        assert name == "dataset.json" or level0 == (tmp_path / "plain" / name).read_bytes()
    meta = json.loads((tmp_path / "level2" / "dataset.json").read_text())
    assert meta["shift"] == {"kind": "scanner", "level": 2}
    assert "scanner:2" in meta["description"]
    assert "shift" not in json.loads(plain)


def test_cli_rejects_bad_shifts_with_one_error_line(capsys):
    from experiments import make_data

    for value in ("scanner", "scanner:9", "blur:1", "anatomy:x"):
        with pytest.raises(SystemExit) as exit_info:
            make_data.main(["--out", "x", "--cases", "1", "--shift", value])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        (error_line,) = [line for line in err.splitlines() if "error:" in line]
        assert error_line.startswith("python -m experiments.make_data: error: argument --shift")
        assert err.startswith("usage:") and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        make_data.main(
            ["--out", "x", "--cases", "1", "--domain", "lesions", "--shift", "anatomy:1"]
        )
    assert exit_info.value.code == 2
    assert "--shift anatomy:1 needs --domain tumour" in capsys.readouterr().err


def test_shift_levels_figure_writes_a_png(tmp_path):
    from vi_seg_jax.data.synthetic.figure import shift_levels_figure

    path = shift_levels_figure(tmp_path / "fig" / "levels.png", shape=(32, 32, 24), seed=SEED)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000
