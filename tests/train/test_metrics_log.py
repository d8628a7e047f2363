"""The metric log: JSON lines and TensorBoard events, read back with TensorBoard's reader."""

import json
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vi_seg_jax.train.metrics_log import TENSORBOARD_DIR, MetricsLog, read_records


def _scalars(workdir, tag):
    events = EventAccumulator(str(workdir / TENSORBOARD_DIR))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def _write_run(workdir, first_step, last_step, offset=0.0):
    with MetricsLog(workdir, first_step) as log:
        for step in range(first_step + 1, last_step + 1):
            log.write({"step": step, "loss": step + offset, "dice": 0.5})


def test_records_go_to_json_lines_and_tensorboard_scalars(tmp_path):
    _write_run(tmp_path, 0, 3)
    records = read_records(tmp_path / "metrics.jsonl")
    assert records == [{"step": s, "loss": float(s), "dice": 0.5} for s in (1, 2, 3)]
    assert _scalars(tmp_path, "loss") == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert _scalars(tmp_path, "dice") == [(1, 0.5), (2, 0.5), (3, 0.5)]


def test_resume_drops_what_a_killed_run_wrote_after_its_checkpoint(tmp_path):
    _write_run(tmp_path, 0, 5)  # killed at step 5, last checkpoint at step 3
    time.sleep(1.1)  # event files are read in name order, which starts with whole seconds
    _write_run(tmp_path, 3, 6, offset=100.0)
    assert [r["step"] for r in read_records(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in read_records(tmp_path / "metrics.jsonl")][3:] == [104, 105, 106]
    # TensorBoard purges the killed run's steps 4-5 at the session-start marker.
    assert _scalars(tmp_path, "loss") == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 104.0),
        (5, 105.0),
        (6, 106.0),
    ]


def test_png_figure_is_logged_as_an_image(tmp_path):
    figure = tmp_path / "figure.png"
    fig, ax = plt.subplots(figsize=(2, 1), dpi=50)
    ax.plot([0, 1])
    fig.savefig(figure)
    plt.close(fig)
    with MetricsLog(tmp_path, 0) as log:
        log.image(7, "validation", figure)
    events = EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    events.Reload()
    (image,) = events.Images("validation")
    assert (image.step, image.width, image.height) == (7, 100, 50)
    assert image.encoded_image_string == figure.read_bytes()


def test_tensorboard_can_be_turned_off(tmp_path):
    with MetricsLog(tmp_path, 0, tensorboard=False) as log:
        assert log.tensorboard_dir is None
        log.write({"step": 1, "loss": 1.0})
    assert not (tmp_path / TENSORBOARD_DIR).exists()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": 1.0}


def test_a_record_without_step_is_refused(tmp_path):
    with MetricsLog(tmp_path, 0) as log, pytest.raises(KeyError):
        log.write({"loss": 1.0})
    assert (tmp_path / "metrics.jsonl").read_text() == ""
