import os
import subprocess
import sys

from tests.data.cases import write_case, write_dataset


def _run(*args, cache):
    env = {**os.environ, "VI_SEG_JAX_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "experiments.inspect_data", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_reports_layout_cases_and_region_volumes(tmp_path):
    root = write_dataset(tmp_path / "msd", "msd")
    result = _run("--data-dir", str(root), "--require-labels", cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert "3 cases in layout msd" in result.stdout
    assert "BRATS_002" in result.stdout
    assert "3 cases valid" in result.stdout
    assert (tmp_path / "cache" / "preprocessed").is_dir()


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
