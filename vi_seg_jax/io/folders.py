"""Where the project keeps its files, and atomic writes of files and folders."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path


def cache_root() -> Path:
    """`$VI_SEG_JAX_CACHE`, else `$XDG_CACHE_HOME/vi_seg_jax`, else `~/.cache/vi_seg_jax`."""
    if "VI_SEG_JAX_CACHE" in os.environ:
        return Path(os.environ["VI_SEG_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vi_seg_jax"


def replace_folder(new: Path, target: Path) -> None:
    """Renames `new` to `target`, moving an old `target` aside first.

    A folder cannot be renamed over a non-empty one; with the old one moved aside first, one
    complete copy exists under one of the two names at every moment (renames are atomic).
    """
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Writes `text` to `path` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data) -> None:
    """`data` as indented JSON with sorted keys, written atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_csv_atomic(path: Path, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    """A CSV file (header, then rows), written atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())
