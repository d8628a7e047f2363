import os
import subprocess
import sys

import numpy as np

from tests.data.cases import brain_image, write_case
from vi_seg_jax.io.nifti import write_nifti


def _run(*args, cache):
    env = {**os.environ, "VI_SEG_JAX_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "experiments.inspect_data", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


# MSD Task01 release labels: 1 edema, 2 non-enhancing tumour core, 3 enhancing tumour.
# BraTS regions: WT = any tumour, TC = core + enhancing, ET = enhancing.
MSD_REGIONS = {"wt": (1, 2, 3), "tc": (2, 3), "et": (3,)}
VOXEL_MM = (10.0, 10.0, 8.0)  # 0.8 ml per voxel: volumes large enough to read at 0.1 ml


def _msd_labels(shape=(6, 7, 5)):
    """Three cases' release labels with different region volumes (one without tumour)."""
    first = np.zeros(shape, np.uint8)
    first[1:5, 1:6, 1:4] = 1
    first[2:4, 2:5, 2:3] = 2
    first[3, 3, 2] = 3
    second = np.zeros(shape, np.uint8)
    second[1:3, 2:6, 1:4] = 1
    second[2, 3:5, 2:4] = 3
    return {"BRATS_001": first, "BRATS_002": second, "BRATS_003": np.zeros(shape, np.uint8)}


def _write_msd(root, labels):
    affine = np.diag([*VOXEL_MM, 1.0])
    for case_id, label in labels.items():
        image = np.stack([brain_image(label.shape, 10.0 * (c + 1)) for c in range(4)], axis=-1)
        write_nifti(root / "imagesTr" / f"{case_id}.nii.gz", image, affine=affine)
        write_nifti(root / "labelsTr" / f"{case_id}.nii.gz", label, affine=affine, kind="label")
    return root


def test_reports_layout_cases_and_region_volumes(tmp_path):
    labels = _msd_labels()
    root = _write_msd(tmp_path / "msd", labels)
    result = _run("--data-dir", str(root), "--require-labels", cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert "3 cases in layout msd" in result.stdout
    assert "3 cases valid" in result.stdout
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line}
    voxel_ml = np.prod(VOXEL_MM) / 1000.0
    for case_id, label in labels.items():
        # case, grid, voxel mm, then the WT/TC/ET volumes in ml: counted here in NumPy.
        _, grid, spacing, *volumes = rows[case_id]
        assert grid == "6x7x5" and spacing == "10x10x8"
        expected = [np.isin(label, MSD_REGIONS[r]).sum() * voxel_ml for r in ("wt", "tc", "et")]
        np.testing.assert_allclose([float(v) for v in volumes], expected, atol=0.051)
        # The cache holds the case, cropped to the brain but with every tumour voxel kept.
        (cached,) = (tmp_path / "cache" / "preprocessed").glob(f"*/{case_id}/label.npy")
        assert np.count_nonzero(np.load(cached)) == np.count_nonzero(label)
    assert rows["BRATS_001"][3:] == ["48.0", "4.8", "0.8"]  # 60, 6 and 1 voxels


def test_bad_input_is_one_line_and_exit_code_2(tmp_path):
    folder = write_case(tmp_path / "data", "brats2021", "BraTS2021_00001")
    bad = folder / "BraTS2021_00001_t1.nii.gz"
    bad.write_bytes(bad.read_bytes()[:50])
    result = _run("--data-dir", str(tmp_path / "data"), cache=tmp_path / "cache")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {bad}: ")
    assert "Traceback" not in result.stderr
    # Nothing half-written is left in the cache.
    preprocessed = tmp_path / "cache" / "preprocessed"
    assert not preprocessed.exists() or not any(
        p.glob("*/BraTS2021_00001") for p in preprocessed.iterdir()
    )


def test_skip_bad_warns_in_one_line_and_continues(tmp_path):
    write_case(tmp_path / "data", "brats2021", "BraTS2021_00001")
    bad = write_case(tmp_path / "data", "brats2021", "BraTS2021_00002")
    (bad / "BraTS2021_00002_seg.nii.gz").write_bytes(b"broken")
    result = _run("--data-dir", str(tmp_path / "data"), "--skip-bad", cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert "warning: " in result.stderr and "BraTS2021_00002_seg.nii.gz" in result.stderr
    assert "1 cases valid" in result.stdout


def test_empty_folder_is_exit_code_2(tmp_path):
    (tmp_path / "empty").mkdir()
    result = _run("--data-dir", str(tmp_path / "empty"), cache=tmp_path / "cache")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"error: {tmp_path / 'empty'}: empty folder; "
        + result.stderr.split("empty folder; ")[1].strip()
    )
