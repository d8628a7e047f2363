"""predict → evaluate end to end on tiny trained runs, and their one-line errors."""

import csv
import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import evaluate, predict, train
from vi_seg_jax.data.conventions import MODALITIES
from vi_seg_jax.data.synthetic import write_dataset
from vi_seg_jax.evaluation import METRICS
from vi_seg_jax.io.nifti import read_nifti

TINY = [
    "--features", "4", "8", "8", "16",
    "--patch", "16", "16", "16",
    "--batch-size", "2",
    "--test-size", "1",
    "--validation-size", "1",
    "--train-size", "2",
    "--steps-per-epoch", "1",
    "--steps", "2",
    "--validation-samples", "2",
    "--no-progress",
    "--no-tensorboard",
]  # fmt: skip


def _trained(tmp_path_factory, layout, task):
    root = tmp_path_factory.mktemp(f"{layout}-{task}")
    data = root / "data"
    write_dataset(data, num_cases=4, layout=layout, shape=(32, 32, 24), seed=4)
    workdir = root / "run"
    with jax.numpy_dtype_promotion("standard"):
        argv = ["--data-dir", str(data), "--workdir", str(workdir), "--task", task, *TINY]
        assert train.main(argv) == 0
    return data, workdir


@pytest.fixture(scope="module")
def wt_run(tmp_path_factory):
    return _trained(tmp_path_factory, "brats2021", "wt")


@pytest.fixture(scope="module")
def regions_run(tmp_path_factory):
    return _trained(tmp_path_factory, "brats2023", "regions")


def _predict(workdir, data, out, *extra):
    argv = ["--checkpoint", str(workdir), "--input", str(data), "--out", str(out)]
    return predict.main([*argv, "--samples", "2", "--window", "16", "--no-progress", *extra])


def _binary_entropy_percent(p):
    p = np.clip(p.astype(np.float64), 1e-12, 1 - 1e-12)
    return 100 * -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def _check_case_files(out, data, case_id, regions):
    source = read_nifti(next(p for p in data.rglob("*.nii.gz") if case_id in p.name))
    seg = read_nifti(out / f"{case_id}_seg.nii.gz")
    assert seg.data.shape == source.data.shape[:3]
    np.testing.assert_allclose(seg.affine, source.affine)
    prob = read_nifti(out / f"{case_id}_prob.nii.gz").data.reshape(*seg.data.shape, -1)
    assert prob.shape[-1] == len(regions) and prob.min() >= 0 and prob.max() <= 1
    for r, region in enumerate(regions):
        unc = read_nifti(out / f"{case_id}_unc_{region}.nii.gz")
        # QU-BraTS format: integers 0..100 on the source grid, with the source affine.
        assert unc.header.get_data_dtype() == np.uint8 and unc.data.shape == seg.data.shape
        assert unc.data.min() >= 0 and unc.data.max() <= 100
        np.testing.assert_array_equal(unc.data, np.rint(unc.data))
        np.testing.assert_allclose(unc.affine, source.affine)
        np.testing.assert_allclose(unc.data, _binary_entropy_percent(prob[..., r]), atol=0.51)
    for name in ("aleatoric", "epistemic"):
        volume = read_nifti(out / f"{case_id}_{name}.nii.gz")
        assert volume.header.get_data_dtype() == np.float32
        assert volume.data.shape[:3] == seg.data.shape
        assert volume.data.min() >= 0
    assert (out / f"{case_id}_overview.png").stat().st_size > 10_000
    return seg.data


def test_wt_predict_then_evaluate_writes_every_file(wt_run, tmp_path, capsys):
    data, workdir = wt_run
    out = tmp_path / "pred"
    assert _predict(workdir, data, out) == 0
    record = json.loads((out / "prediction.json").read_text())
    assert record["task"] == "wt" and record["samples"] == 2 and len(record["cases"]) == 4
    calibration = json.loads((workdir / "calibration.json").read_text())
    assert record["temperature"] == calibration["temperature"]
    for case_id in record["cases"]:
        seg = _check_case_files(out, data, case_id, ("wt",))
        assert set(np.unique(seg)) <= {0, 1}
        assert not (out / f"{case_id}_unc_tc.nii.gz").exists()

    # Reproducible: a fixed key per case.
    again = tmp_path / "again"
    assert _predict(workdir, data / record["cases"][0], again) == 0
    first = record["cases"][0]
    for name in ("prob", "epistemic"):
        np.testing.assert_array_equal(
            read_nifti(out / f"{first}_{name}.nii.gz").data,
            read_nifti(again / f"{first}_{name}.nii.gz").data,
        )

    evaluation = tmp_path / "eval"
    argv = ["--pred", str(out), "--data-dir", str(data), "--out", str(evaluation)]
    assert evaluate.main([*argv, "--no-progress"]) == 0
    with open(evaluation / "cases.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["case_id"] for row in rows] == record["cases"]
    assert set(rows[0]) == {"case_id"} | {f"wt_{m}" for m in METRICS}
    summary = json.loads((evaluation / "summary.json").read_text())
    assert set(summary) == {"wt"} and set(summary["wt"]) == set(METRICS)
    dices = [float(row["wt_dice"]) for row in rows]
    assert summary["wt"]["dice"]["mean"] == pytest.approx(np.mean(dices), abs=1e-5)
    for plot in ("reliability.png", "qubrats_curves.png"):
        assert (evaluation / plot).stat().st_size > 10_000
    assert "| WT |" in capsys.readouterr().out


def test_regions_model_writes_release_labels_and_three_uncertainty_maps(regions_run, tmp_path):
    data, workdir = regions_run
    out = tmp_path / "pred"
    assert _predict(workdir, data, out) == 0
    record = json.loads((out / "prediction.json").read_text())
    assert record["task"] == "regions" and set(record["temperature"]) == {"wt", "tc", "et"}
    for case_id in record["cases"]:
        seg = _check_case_files(out, data, case_id, ("wt", "tc", "et"))
        assert set(np.unique(seg)) <= {0, 1, 2, 3}  # BraTS 2023 labels
    evaluation = tmp_path / "eval"
    argv = ["--pred", str(out), "--data-dir", str(data), "--out", str(evaluation)]
    assert evaluate.main([*argv, "--no-progress"]) == 0
    assert set(json.loads((evaluation / "summary.json").read_text())) == {"wt", "tc", "et"}


def _cli(module, *args):
    return subprocess.run(
        [sys.executable, "-m", f"experiments.{module}", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_predict_errors_are_one_line(wt_run, tmp_path):
    data, workdir = wt_run
    out = tmp_path / "out"
    _one_line_error(_cli("predict", "--checkpoint", tmp_path, "--input", data, "--out", out),
                    "no config.json")  # fmt: skip

    # A checkpoint of another backbone size than its config.json.
    other = tmp_path / "other"
    shutil.copytree(workdir, other)
    config = json.loads((other / "config.json").read_text())
    config["backbone"]["features"] = [4, 8, 8, 32]
    (other / "config.json").write_text(json.dumps(config))
    result = _cli("predict", "--checkpoint", other, "--input", data, "--out", out)
    _one_line_error(result, "was written for backbone")

    # A case without one of the model's modalities.
    broken = tmp_path / "broken"
    case = next(p for p in data.iterdir() if p.is_dir())
    shutil.copytree(case, broken / case.name)
    next((broken / case.name).glob(f"*_{MODALITIES[0]}.nii.gz")).unlink()
    result = _cli("predict", "--checkpoint", workdir, "--input", broken, "--out", out)
    _one_line_error(result, case.name)
    assert not out.exists() or not any(out.iterdir())


def test_evaluate_errors_are_one_line(wt_run, tmp_path):
    data, workdir = wt_run
    _one_line_error(
        _cli("evaluate", "--pred", tmp_path, "--data-dir", data, "--out", tmp_path / "e"),
        "no prediction.json",
    )
    out = tmp_path / "pred"
    case = sorted(p for p in data.iterdir() if p.is_dir())[0]
    assert _predict(workdir, case, out) == 0
    # A segmentation on another grid than the ground truth.
    seg_path = out / f"{case.name}_seg.nii.gz"
    seg = read_nifti(seg_path)
    from vi_seg_jax.io.nifti import write_nifti

    write_nifti(seg_path, seg.data[:-2], affine=seg.affine, kind="label")
    result = _cli("evaluate", "--pred", out, "--data-dir", data, "--out", tmp_path / "e")
    _one_line_error(result, "_seg.nii.gz", "differs from the ground truth")


def test_predict_the_runs_test_split_and_evaluate_against_its_dataset(wt_run, tmp_path):
    _, workdir = wt_run
    out = tmp_path / "pred"
    argv = ["--checkpoint", str(workdir), "--split", "test", "--out", str(out)]
    assert predict.main([*argv, "--samples", "1", "--window", "16", "--no-progress"]) == 0
    test_ids = json.loads((workdir / "splits.json").read_text())["test"]
    assert json.loads((out / "prediction.json").read_text())["cases"] == sorted(test_ids)
    evaluation = tmp_path / "eval"
    assert evaluate.main(["--pred", str(out), "--out", str(evaluation), "--no-progress"]) == 0
    assert (evaluation / "cases.csv").read_text().count("\n") == 1 + len(test_ids)


def _numpy_ece(p, y, bins=15):
    """ECE over the bins [b/B, (b+1)/B) of p (the last one closed)."""
    index = np.minimum(np.digitize(p, np.linspace(0, 1, bins + 1)) - 1, bins - 1)
    return sum(
        np.sum(index == b) / p.size * abs(y[index == b].mean() - p[index == b].mean())
        for b in range(bins)
        if np.any(index == b)
    )


def test_temperature_calibrates_what_predict_writes_and_every_map_says_which_predictive(
    wt_run, tmp_path
):
    """The validation split predicted as `predict` does gives back the fitted temperature."""
    data, workdir = wt_run
    calibration = json.loads((workdir / "calibration.json").read_text())
    out = tmp_path / "pred"
    argv = ["--checkpoint", str(workdir), "--split", "validation", "--out", str(out)]
    assert predict.main([*argv, "--no-progress"]) == 0  # the default samples and windows
    record = json.loads((out / "prediction.json").read_text())
    assert {k: record[k] for k in ("samples", "window", "overlap")} == calibration["predictor"]
    temperature = calibration["temperature"]["wt"]
    assert temperature != 1.0

    from vi_seg_jax.data.preprocess import brain_mask

    pooled_p, pooled_y = [], []
    for case_id in record["cases"]:
        case = data / case_id
        image = np.stack(
            [read_nifti(next(case.glob(f"*_{m}.nii.gz"))).data for m in MODALITIES], axis=-1
        )
        truth = read_nifti(next(case.glob("*_seg.nii.gz"))).data > 0  # whole tumour
        brain = brain_mask(image)
        mean = read_nifti(out / f"{case_id}_prob_uncalibrated.nii.gz").data.astype(np.float64)
        prob = read_nifti(out / f"{case_id}_prob.nii.gz").data.astype(np.float64)
        aleatoric = read_nifti(out / f"{case_id}_aleatoric.nii.gz").data
        epistemic = read_nifti(out / f"{case_id}_epistemic.nii.gz").data
        # The variance maps split the uncalibrated predictive's Bernoulli variance ...
        np.testing.assert_allclose(aleatoric + epistemic, mean * (1 - mean), atol=2e-6)
        # ... and `_prob` is that predictive through the temperature.
        clipped = np.clip(mean, 1e-7, 1 - 1e-7)
        logit = np.log(clipped) - np.log1p(-clipped)
        np.testing.assert_allclose(prob, 1 / (1 + np.exp(-logit / temperature)), atol=1e-6)
        pooled_p.append(mean[brain])
        pooled_y.append(truth[brain])
    p, y = np.concatenate(pooled_p), np.concatenate(pooled_y)

    # The NLL-optimal temperature of the written predictive is the recorded one.
    def nll(t):
        z = np.log(np.clip(p, 1e-7, 1 - 1e-7)) - np.log1p(-np.clip(p, 1e-7, 1 - 1e-7))
        return np.mean(np.logaddexp(0, np.where(y, -z / t, z / t)))

    grid = temperature * np.exp(np.linspace(-0.05, 0.05, 11))
    assert np.argmin([nll(t) for t in grid]) == 5
    assert calibration["ece_before"]["wt"] == pytest.approx(_numpy_ece(p, y), abs=1e-6)

    # evaluate reports the ECE before the temperature from the real uncalibrated values.
    evaluation = tmp_path / "eval"
    assert evaluate.main(["--pred", str(out), "--out", str(evaluation), "--no-progress"]) == 0
    with open(evaluation / "cases.csv") as handle:
        row = next(csv.DictReader(handle))
    assert float(row["wt_ece_uncalibrated"]) == pytest.approx(_numpy_ece(p, y), rel=1e-4)


def test_an_interrupted_prediction_continues_where_it_stopped(wt_run, tmp_path, monkeypatch):
    from vi_seg_jax.predict import Predictor, load_trained, predict_folder

    data, workdir = wt_run
    predictor = Predictor(load_trained(workdir), num_samples=2, window_size=16)
    whole = tmp_path / "whole"
    record = predict_folder(predictor, whole, data_dir=data, progress=False)
    assert len(record["cases"]) == 4

    predicted = []
    real_predict_case = Predictor.predict_case

    def counting(self, case, *, progress=True):
        if len(predicted) == 2 and stop_after_two:
            raise KeyboardInterrupt  # as a Ctrl-C or a kill between two cases
        predicted.append(case.case_id)
        return real_predict_case(self, case, progress=progress)

    monkeypatch.setattr(Predictor, "predict_case", counting)
    out = tmp_path / "out"
    stop_after_two = True
    with pytest.raises(KeyboardInterrupt):
        predict_folder(predictor, out, data_dir=data, progress=False)
    first = list(predicted)
    assert json.loads((out / "prediction.json").read_text())["cases"] == first

    predicted.clear()
    stop_after_two = False
    again = predict_folder(predictor, out, data_dir=data, progress=False, resume=True)
    assert predicted == [c for c in record["cases"] if c not in first]  # only the rest
    assert again == record
    for path in sorted(whole.glob("*.nii.gz")):
        np.testing.assert_array_equal(read_nifti(path).data, read_nifti(out / path.name).data)

    # Other settings: nothing is kept.
    predicted.clear()
    other = Predictor(load_trained(workdir), num_samples=1, window_size=16)
    predict_folder(other, out, data_dir=data, progress=False, resume=True)
    assert predicted == record["cases"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_prediction_file_is_readable_as_the_umask_allows(wt_run, tmp_path, umask):
    import os
    import stat

    from vi_seg_jax.predict import Predictor, load_trained, predict_folder

    data, workdir = wt_run
    case = sorted(p for p in data.iterdir() if p.is_dir())[0]
    old = os.umask(umask)
    try:
        predictor = Predictor(load_trained(workdir), num_samples=1, window_size=16)
        predict_folder(predictor, tmp_path / "out", data_dir=case, progress=False)
    finally:
        os.umask(old)
    files = sorted((tmp_path / "out").iterdir())
    kinds = {p.name.split(".", 1)[1] for p in files}
    assert kinds == {"nii.gz", "png", "json"} and len(files) >= 7
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def test_predict_with_test_time_flips(wt_run, tmp_path, capsys):
    """`--tta flips`: a TTA map beside the variance split, recorded and kept apart by
    `--continue`; the temperatures (fitted without flips) are applied with a note."""
    data, workdir = wt_run
    case = sorted(p for p in data.iterdir() if p.is_dir())[0]
    out = tmp_path / "pred"
    assert _predict(workdir, case, out, "--tta", "flips") == 0
    err = capsys.readouterr().err
    assert "note: the temperatures were fitted with" in err and "'tta': 'flips'" in err
    assert "2 samples each × 8 flips" in err
    record = json.loads((out / "prediction.json").read_text())
    assert record["tta"] == "flips" and record["cases"] == [case.name]
    # The QU-BraTS maps are the entropy of the pooled, calibrated probability.
    _check_case_files(out, data, case.name, ("wt",))

    def volume(name):
        return read_nifti(out / f"{case.name}_{name}.nii.gz").data.astype(np.float64)

    tta = read_nifti(out / f"{case.name}_tta.nii.gz")
    assert tta.header.get_data_dtype() == np.float32 and tta.data.min() >= 0
    assert tta.data.max() > 1e-6  # a trained 3D U-Net is no mirror image of itself
    mean = volume("prob_uncalibrated")  # p̄ over (sample, flip) pairs
    total = volume("aleatoric") + volume("epistemic") + volume("tta")
    np.testing.assert_allclose(total, mean * (1 - mean), atol=2e-6)

    # --continue keeps a case of the same TTA and redoes one of another.
    assert _predict(workdir, case, out, "--tta", "flips", "--continue") == 0
    assert "continuing: 1 case(s)" in capsys.readouterr().err
    assert _predict(workdir, case, out, "--continue") == 0
    err = capsys.readouterr().err
    assert "continuing" not in err and "'tta'" not in err  # no TTA in either setting
    assert json.loads((out / "prediction.json").read_text())["tta"] == "none"
    assert not (out / f"{case.name}_tta.nii.gz").exists()  # no map left from the flips
