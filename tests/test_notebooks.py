"""Every notebook under notebooks/ runs top to bottom in quick mode (tiny data, tiny model)."""

import os
from pathlib import Path

import pytest

# Jupyter's own paths, without its notice about the move to platformdirs.
os.environ.setdefault("JUPYTER_PLATFORM_DIRS", "1")

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS][:4] == [
        "01_data.ipynb",
        "02_predictions.ipynb",
        "03_tables.ipynb",
        "04_uncertainty.ipynb",
    ]


def _with_quick_mode(notebook):
    """Sets `QUICK = True` right after the cell tagged `parameters`."""
    index = next(
        i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])
    )
    assert "QUICK" in notebook.cells[index].source
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell("QUICK = True"))
    return notebook


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_quick_mode(path, tmp_path, monkeypatch):
    from jax import config

    # The kernel inherits this environment: CPU, a private data cache, and the suite's
    # compile cache with most XLA optimisations off (compilation dominates tiny runs).
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("VI_SEG_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", config.jax_compilation_cache_dir)
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")

    notebook = _with_quick_mode(nbformat.read(path, as_version=4))
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    try:
        client.execute()
    except CellExecutionError as error:
        pytest.fail(f"{path.name}: {error}", pytrace=False)
    images = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert images, f"{path.name} shows no figure"
