"""Where the project keeps its files, and atomic writes of files and folders.

Atomic writes go through a temporary file or folder, which Python creates owner-only; the
final file or folder gets the permissions a plain `open()` or `mkdir()` would give under the
current umask, so a lab's group can read what the project writes.
"""

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


def _current_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file under the current umask."""
    return 0o666 & ~_current_umask()


def new_folder_mode() -> int:
    """The mode `mkdir` gives a new folder under the current umask."""
    return 0o777 & ~_current_umask()


def replace_folder(new: Path, target: Path) -> None:
    """Renames `new` to `target`, moving an old `target` aside first.

    A folder cannot be renamed over a non-empty one; with the old one moved aside first, one
    complete copy exists under one of the two names at every moment (renames are atomic).
    """
    os.chmod(new, new_folder_mode())  # staged with mkdtemp, which is owner-only
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
        os.fchmod(fd, new_file_mode())
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
