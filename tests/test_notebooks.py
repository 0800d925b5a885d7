"""Every notebook in notebooks/ is stored clean, opens with its Colab badge, and runs.

Execution uses nbclient with the ``python3`` kernel in smoke mode (``IMPUS_LITE_SMOKE=1``) and
matplotlib's inline backend, from inside notebooks/ as a user would. The code of every hidden
solution (the ```python blocks inside a ``<details>`` cell) runs too, right after its exercise,
so a solution cannot rot; and every cell that ends a figure with a top-level ``plt.show()``
must put a PNG in its outputs. New notebooks are picked up by the glob; nothing here needs
editing when one is added.
"""

import functools
import importlib.util
import os
import re
from pathlib import Path

import nbformat
import pytest

from impus_lite.checks import STRICT_ENV
from impus_lite.runtime import REPO_URL, colab_badge

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"

#: Phrases that were true once and are not any more. Each must not come back in any notebook.
STALE_PHRASES = {
    "until the classroom model ships": "smoke mode uses the classroom model, which ships",
    "tiny random model in smoke mode": "smoke mode uses the classroom model",
    "With the tiny random model the pictures are noise": "smoke mode uses the classroom model",
    "--model tiny": "the README's morph runs on --model classroom",
    "W * 2": "list repetition: write the guidance per rendered code explicitly",
    "TEXT_LR = 5e-3": "quote the fast preset's text_lr from MorphConfig, do not type it",
    "the `fast` preset at 5e-3": "quote the fast preset's text_lr from MorphConfig",
    "have no\n`prompt.txt`": "the bundled pairs carry a prompt.txt",
    "have no `prompt.txt`": "the bundled pairs carry a prompt.txt",
    "does not run as published": "unsourced: cite the issue thread or drop it",
    "W(\\xi_0, \\xi) + \\alpha W(\\xi_1, \\xi)": "the barycenter objective uses W squared",
    "model of smoke mode": "smoke mode uses the classroom model, a small trained one",
    "random model the frames add": "smoke mode uses the classroom model, a small trained one",
    "32 for the tiny model": "the classroom model's text embeddings have D = 128",
    "about not measured yet": "say 'not measured yet' without 'about'",
    "(not measured yet)": "every notebook's CPU runtime is measured: state the figure",
    "compared in notebooks 06 and 08": "notebook 10 compares DiffMorpher; 06 uses its reschedule",
    "($1/(K-1)$ for a straight path)": "1/(K-1) holds for a metric; LPIPS, close to quadratic, gives 1/(K-1)^2",
    "reported as about as good": "unsourced: 50 inversion steps are this package's choice for speed",
    "be about as good)": "unsourced: 50 inversion steps are this package's choice for speed",
    "could not be downloaded (offline)": "the LPIPS trunk ships in data/lpips: LPIPS is real offline",
    "LPIPS also runs on a random": "the LPIPS trunk ships in data/lpips: LPIPS is real offline",
    "needs ImageNet weights that are": "the LPIPS trunk ships in data/lpips: nothing is downloaded",
    "trunk needs ImageNet weights": "the LPIPS trunk ships in data/lpips: nothing is downloaded",
    "runs on a random\n> AlexNet trunk": "the LPIPS trunk ships in data/lpips: LPIPS is real offline",
}
INSTALL_URL = re.compile(r'^REPO_URL = "([^"]+)"', re.M)
TOP_LEVEL_SHOW = re.compile(r"^plt\.show\(\)", re.M)


def notebook_param(path):
    return pytest.param(path, id=path.stem)


def read(path):
    return nbformat.read(path, as_version=4)


def install_cell(notebook):
    cells = [c for c in notebook.cells if c.cell_type == "code" and INSTALL_URL.search(c.source)]
    return cells[0] if cells else None


@functools.lru_cache(maxsize=1)
def site_prepare():
    """docs/prepare.py as a module: the site build and this test share its notebook helpers."""
    spec = importlib.util.spec_from_file_location("site_prepare", NOTEBOOK_DIR.parent / "docs" / "prepare.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    return prepare


def with_solutions(notebook):
    """A copy of the notebook in which every hidden solution's code runs as a code cell placed
    right after its ``<details>`` cell, tagged ``solution`` (docs/prepare.py's, which the site
    build uses too)."""
    return site_prepare().with_solutions(notebook)


def keep_for_the_site(path, notebook):
    """With ``IMPUS_LITE_EXECUTED_DIR`` set, keep the executed notebook there, stamped by
    docs/prepare.py's ``stamp``: the site build (docs/build.sh) then reuses it instead of
    executing the notebook a second time."""
    folder = os.environ.get("IMPUS_LITE_EXECUTED_DIR")
    if not folder:
        return
    site_prepare().stamp(notebook, path, smoke=True)
    Path(folder).mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, Path(folder) / path.name)


def stdout(cell):
    return "".join(output.get("text", "") for output in cell.get("outputs", [])
                   if output.get("output_type") == "stream")


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
def test_notebook_has_no_stale_phrases(path):
    text = "\n".join(cell.source for cell in read(path).cells)
    found = {phrase: why for phrase, why in STALE_PHRASES.items() if phrase in text}
    assert not found, f"{path.name}: stale text: {found}"


@pytest.mark.parametrize("path", [notebook_param(p) for p in NOTEBOOKS])
def test_install_cell_is_the_shared_one_with_the_package_url(path):
    cell = install_cell(read(path))
    assert cell is not None, f"{path.name}: no install cell (a code cell setting REPO_URL = \"...\")"
    assert INSTALL_URL.search(cell.source).group(1) == REPO_URL, (
        f"{path.name}: the install cell's REPO_URL differs from impus_lite.runtime.REPO_URL")
    reference = install_cell(read(NOTEBOOKS[0])).source
    assert cell.source == reference, f"{path.name}: the install cell differs from {NOTEBOOKS[0].name}'s"
    for needed in ("git\", \"-C\"", "\"pull\"", "shutil.rmtree", "\"-e\""):
        assert needed in cell.source, f"{path.name}: the install cell lost {needed} (rerun safety)"


@pytest.mark.parametrize("path", [notebook_param(p) for p in NOTEBOOKS])
def test_notebook_states_runtime_and_ends_with_further_reading(path):
    markdown = [cell.source for cell in read(path).cells if cell.cell_type == "markdown"]
    assert any(s.startswith("**Runtime.**") for s in markdown[:4]), (
        f"{path.name}: a '**Runtime.**' note belongs near the top")
    assert read(path).cells[-1].source.startswith("## Further reading"), (
        f"{path.name}: the last cell should be '## Further reading'")


@pytest.mark.parametrize("path", [notebook_param(p) for p in NOTEBOOKS])
def test_the_course_map_reads_each_lessons_goals_as_a_list(path):
    goals = site_prepare().lesson_facts(path)["goals"]
    assert len(goals) >= 3, (f"{path.name}: the course map found {len(goals)} goals; write them as a "
                             "'**You will learn to**' cell with one '- ' line per goal")
    assert all(len(g) >= 15 and "\n" not in g for g in goals), goals


def test_the_api_page_documents_every_module():
    prepare = site_prepare()
    page = prepare.api_page()
    missing = [m for m in prepare.modules() if m != "impus_lite" and f".. automodule:: {m}\n" not in page]
    assert not missing, f"modules in no section of the API reference: {missing}"


@pytest.mark.parametrize("path", [notebook_param(p) for p in NOTEBOOKS])
def test_notebook_and_its_solutions_execute_in_smoke_mode_with_their_figures(path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("IMPUS_LITE_SMOKE", "1")
    monkeypatch.setenv("MPLBACKEND", INLINE_BACKEND)
    monkeypatch.setenv(STRICT_ENV, "1")  # a check whose solution is wrong raises: the cell fails
    notebook = with_solutions(read(path))
    assert len(notebook.cells) > len(read(path).cells) or "<details>" not in str(read(path).cells), (
        f"{path.name}: <details> cells hold no ```python block to run")
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()  # raises CellExecutionError, naming the cell, on the first failure

    def pngs(cell):
        return sum("image/png" in output.get("data", {}) for output in cell.get("outputs", []))

    missing = [i for i, cell in enumerate(notebook.cells)
               if cell.cell_type == "code" and TOP_LEVEL_SHOW.search(cell.source) and not pngs(cell)]
    assert not missing, f"{path.name}: cells {missing} call plt.show() but show no figure"
    main = [c for c in notebook.cells if "solution" not in c.metadata.get("tags", [])]
    total = sum(pngs(c) for c in main if c.cell_type == "code")
    promised = notebook.metadata.get("impus_lite", {}).get("figures", 1)
    assert total >= promised, f"{path.name}: {total} figures, the notebook promises {promised}"
    unchecked = [i for i, cell in enumerate(notebook.cells)
                 if cell.cell_type == "code" and "checks.check_" in cell.source and "✓ right" not in stdout(cell)]
    assert not unchecked, f"{path.name}: check cells {unchecked} did not print '✓ right' with the solutions"
    keep_for_the_site(path, notebook)


def test_notebook_10_runs_every_method_with_the_published_metrics():
    """Notebook 10 puts every method of impus_lite.methods side by side: a method added to the
    package must get its row in the notebook's RUNS table (the notebook asserts the same when it
    runs), and the table's numbers come from impus_lite.metrics, not from code of its own."""
    from impus_lite.config import METHODS

    path = NOTEBOOK_DIR / "10_impus_among_neighbours.ipynb"
    code = "\n".join(cell.source for cell in read(path).cells if cell.cell_type == "code")
    missing = [method for method in METHODS if f'"{method}": (' not in code]
    assert not missing, f"{path.name}: no run of {missing} in RUNS"
    for needed in ("compute_many(", "impus_lite.morph(", "method_options"):
        assert needed in code, f"{path.name}: {needed} is gone"
