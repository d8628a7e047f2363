"""The run's metric log: `metrics.jsonl`, plus TensorBoard event files when TensorBoard is
installed (`pip install "vi_seg_jax[tensorboard]"`; view with `tensorboard --logdir WORKDIR`).

TensorBoard's own writer and protos are used (no TensorFlow needed). On resume, lines and
events written after the restored step (by a run killed after its last checkpoint) are
dropped: the JSON log is truncated, and the event file gets a session-start marker just
after the restored step, which tells TensorBoard to discard later events of the killed run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from vi_seg_jax.io.folders import write_text_atomic

TENSORBOARD_DIR = "tensorboard"


class _EventWriter:
    """Scalars and PNG images as TensorBoard events."""

    def __init__(self, logdir: Path, first_step: int):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event_pb2 = event_pb2
        self._summary_pb2 = summary_pb2
        self._writer = EventFileWriter(str(logdir))
        if first_step > 0:
            # TensorBoard discards earlier-written events from this step on.
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._write(first_step + 1, session_log=start)

    def _write(self, step: int, **fields: Any) -> None:
        self._writer.add_event(self._event_pb2.Event(wall_time=time.time(), step=step, **fields))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        value = self._summary_pb2.Summary.Value
        summary = self._summary_pb2.Summary(
            value=[value(tag=tag, simple_value=v) for tag, v in values.items()]
        )
        self._write(step, summary=summary)

    def png(self, step: int, tag: str, path: Path) -> None:
        import matplotlib.image

        height, width = matplotlib.image.imread(path).shape[:2]
        image = self._summary_pb2.Summary.Image(
            height=height, width=width, colorspace=4, encoded_image_string=path.read_bytes()
        )
        summary = self._summary_pb2.Summary(
            value=[self._summary_pb2.Summary.Value(tag=tag, image=image)]
        )
        self._write(step, summary=summary)

    def close(self) -> None:
        self._writer.close()


def tensorboard_available() -> bool:
    try:
        import tensorboard.summary.writer.event_file_writer  # noqa: F401
    except ImportError:
        return False
    return True


class MetricsLog:
    """Appends records (`{"step": ..., name: value, ...}`) to `metrics.jsonl` and TensorBoard.

    Opening it at `first_step` drops whatever the log holds after that step. Use as a
    context manager. `enabled=False` (processes other than 0 of a multi-process run)
    writes nothing.
    """

    def __init__(
        self, workdir: Path, first_step: int, *, tensorboard: bool = True, enabled: bool = True
    ):
        self.path = workdir / "metrics.jsonl"
        self._handle = None
        self._events = None
        if not enabled:
            return
        _truncate(self.path, first_step)
        self._handle = open(self.path, "a")
        if tensorboard and tensorboard_available():
            self._events = _EventWriter(workdir / TENSORBOARD_DIR, first_step)

    @property
    def tensorboard_dir(self) -> Path | None:
        return None if self._events is None else self.path.parent / TENSORBOARD_DIR

    def write(self, record: dict[str, Any]) -> None:
        if self._handle is None:
            return
        step = record["step"]
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()
        if self._events is not None:
            self._events.scalars(step, {k: float(v) for k, v in record.items() if k != "step"})

    def image(self, step: int, tag: str, png: Path) -> None:
        if self._events is not None:
            self._events.png(step, tag, png)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        if self._events is not None:
            self._events.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl`."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = [record for record in read_records(path) if record["step"] <= step]
    write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in kept))
