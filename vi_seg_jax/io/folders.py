"""Atomic replacement of a folder written beside its destination."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


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
