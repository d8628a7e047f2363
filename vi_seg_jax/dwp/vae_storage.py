"""Kernel VAE folders on disk: `directory/params/` (Orbax) and `directory/config.json`.

No pickle: the parameters are Orbax arrays and the `VAEConfig` is JSON with a format name
and version. `load_vae` checks the stored array shapes against the config before restoring
and raises `DataError` naming what is missing or wrong.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from vi_seg_jax.dwp.vae import Params, VAEConfig, init_vae
from vi_seg_jax.errors import DataError, first_line
from vi_seg_jax.io.folders import replace_folder

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
FORMAT_NAME = "vi_seg_jax.dwp.kernel_vae"
FORMAT_VERSION = 1


def save_vae(directory: str | Path, params: Params, config: VAEConfig) -> None:
    """Writes `directory/params/` (Orbax, arrays and JSON metadata) and
    `directory/config.json`, replacing any VAE already there.

    Everything is written into a temporary sibling directory first and renamed into place,
    so a crash leaves either the old VAE or the new one, never a half-written one.
    """
    directory = Path(directory).absolute()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp / PARAMS_DIR, params)
            checkpointer.wait_until_finished()
        document = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": config.to_dict()}
        (tmp / CONFIG_FILE).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        replace_folder(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_vae(directory: str | Path) -> tuple[Params, VAEConfig]:
    """Reads a VAE written by `save_vae`; raises DataError naming what is missing or wrong."""
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise DataError(directory, "no kernel VAE here (not a directory)")
    config = _read_config(directory / CONFIG_FILE)
    params_path = directory / PARAMS_DIR
    if not params_path.is_dir():
        raise DataError(params_path, "kernel VAE parameters missing")
    like = jax.eval_shape(functools.partial(init_vae, config=config), jax.random.key(0))
    expected = _shapes(like)
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            stored = _shapes(checkpointer.metadata(params_path).item_metadata.tree)
        except Exception as error:  # Orbax raises many types; all mean an unreadable VAE
            raise DataError(
                params_path, f"unreadable kernel VAE parameters: {first_line(error)}"
            ) from error
        # Compared before restoring: a restore that fails midway leaves Orbax coroutines
        # never awaited, and the arrays' shapes say all that is wrong anyway.
        if stored != expected:
            differing = sorted(set(stored.items()) ^ set(expected.items()))
            raise DataError(
                params_path,
                f"kernel VAE parameters do not match {CONFIG_FILE} "
                f"(first difference: {differing[0][0]})",
            )
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        try:
            params = checkpointer.restore(params_path, abstract)
        except Exception as error:
            raise DataError(
                params_path, f"unreadable kernel VAE parameters: {first_line(error)}"
            ) from error
    return params, config


def _shapes(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """'/'-joined path → (shape, dtype name) of every array (or array metadata) leaf."""
    flat = traverse_util.flatten_dict(tree, sep="/")
    return {path: (tuple(leaf.shape), np.dtype(leaf.dtype).name) for path, leaf in flat.items()}


def _read_config(path: Path) -> VAEConfig:
    if not path.is_file():
        raise DataError(path, "kernel VAE config missing")
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(path, f"unreadable kernel VAE config: {error}") from error
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise DataError(path, f"not a kernel VAE config (expected format {FORMAT_NAME!r})")
    if document.get("version") != FORMAT_VERSION:
        raise DataError(
            path,
            f"kernel VAE format version {document.get('version')!r}, expected {FORMAT_VERSION}",
        )
    values = document.get("config")
    try:
        if not isinstance(values, dict):
            raise TypeError("'config' is not an object")
        return VAEConfig(**values)
    except (TypeError, ValueError) as error:
        raise DataError(path, f"invalid kernel VAE config: {error}") from error
