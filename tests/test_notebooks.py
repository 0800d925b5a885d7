"""Every notebook in notebooks/ is stored clean, opens with its Colab badge, and runs.

Execution uses nbclient with the ``python3`` kernel in smoke mode (``IMPUS_LITE_SMOKE=1``,
matplotlib's Agg backend), from inside notebooks/ as a user would. New notebooks are picked up
by the glob; nothing here needs editing when one is added.
"""

from pathlib import Path

import nbformat
import pytest

from impus_lite.runtime import colab_badge

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600


def notebook_param(path):
    return pytest.param(path, id=path.stem)


def read(path):
    return nbformat.read(path, as_version=4)


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", [notebook_param(p) for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    dirty = [i for i, cell in enumerate(read(path).cells)
             if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count"))]
    assert not dirty, f"{path.name}: code cells {dirty} keep outputs or execution counts; clear them"


@pytest.mark.parametrize("path", [notebook_param(p) for p in NOTEBOOKS])
def test_notebook_opens_with_its_colab_badge(path):
    markdown = [cell.source for cell in read(path).cells if cell.cell_type == "markdown"]
    assert markdown, f"{path.name} has no markdown cell"
    assert colab_badge(path.name) in markdown[0], (
        f"{path.name}: the first markdown cell must contain "
        f"impus_lite.runtime.colab_badge({path.name!r})")


@pytest.mark.parametrize("path", [notebook_param(p) for p in NOTEBOOKS])
def test_notebook_executes_in_smoke_mode(path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("IMPUS_LITE_SMOKE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = read(path)
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()  # raises CellExecutionError, naming the cell, on the first failure
