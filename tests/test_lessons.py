"""What makes a notebook a lesson a lecturer can give and a student can work through.

Structure, checked on the stored notebooks (their execution, with the hidden solutions and
strict checks, is tests/test_notebooks.py's):

- a **Lecture plan.** near the top (what to run live, how long) and a "## Takeaways" section;
- a **Runtime.** note of one line or a small table;
- exercises the student writes: a markdown cell "**Exercise N (write: ...).**", then the stub
  (a code cell that raises NotImplementedError or leaves ``= ...`` for the answer), then the
  hidden solution (a <details> cell), then a cell that calls an ``impus_lite.checks`` check;
  derivations ("**Derivation N (pen and paper).**") follow the same four cells;
- no notebook so long that it cannot be one sitting.
"""

import os
import re
from pathlib import Path

import nbformat
import pytest

from impus_lite import checks
from impus_lite.runtime import MODEL_ENV, notebook_model_name

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
MAX_SOURCE_CHARS = 33_000      # about 30k characters of text and code: one lecture
MAX_RUNTIME_CHARS = 400        # one line; a table may be longer
WRITE = re.compile(r"^\*\*Exercise \d+ \(write[:)]", re.M)
DERIVATION = re.compile(r"^\*\*Derivation \d+ \(pen and paper\)", re.M)
STUB = re.compile(r"raise NotImplementedError|^\s*\w+\s*=\s*\.\.\.", re.M)


def read(path):
    return nbformat.read(path, as_version=4)


def four_cell_exercises(notebook, opening):
    """Indices of the cells that open an exercise matching ``opening``; raises AssertionError
    naming the cell when its stub, solution or check is missing."""
    cells, found = notebook.cells, []
    for i, cell in enumerate(cells):
        if cell.cell_type != "markdown" or not opening.search(cell.source):
            continue
        following = cells[i + 1:i + 4]
        assert len(following) == 3, f"cell {i}: an exercise needs a stub, a solution and a check after it"
        stub, solution, check = following
        assert stub.cell_type == "code" and STUB.search(stub.source), (
            f"cell {i + 1}: the stub must raise NotImplementedError or leave '= ...' for the answer")
        assert solution.cell_type == "markdown" and "<details>" in solution.source and "```python" in solution.source, (
            f"cell {i + 2}: the solution belongs in a <details> cell with a ```python block")
        assert check.cell_type == "code" and "checks.check_" in check.source, (
            f"cell {i + 3}: the check cell must call an impus_lite.checks check")
        found.append(i)
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_opens_with_a_lecture_plan_and_closes_with_takeaways(path):
    markdown = [c.source for c in read(path).cells if c.cell_type == "markdown"]
    assert any(s.startswith("**Lecture plan.**") for s in markdown[:5]), (
        f"{path.name}: a '**Lecture plan.**' cell belongs among the first cells")
    assert any(s.startswith("## Takeaways") for s in markdown), f"{path.name}: no '## Takeaways' section"
    runtime = next(s for s in markdown if s.startswith("**Runtime.**"))
    assert len(runtime) <= MAX_RUNTIME_CHARS or "|---" in runtime.replace(" ", ""), (
        f"{path.name}: the runtime note is {len(runtime)} characters: one line or a small table")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_one_sitting_long(path):
    chars = sum(len(c.source) for c in read(path).cells)
    assert chars <= MAX_SOURCE_CHARS, f"{path.name}: {chars} characters of text and code; split it"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_exercise_the_student_writes_has_a_stub_a_solution_and_a_check(path):
    notebook = read(path)
    four_cell_exercises(notebook, WRITE)
    four_cell_exercises(notebook, DERIVATION)


def _python(source: str):
    """A code cell's source parsed, its IPython lines (magics, shell escapes) blanked."""
    import ast
    return ast.parse("\n".join("" if line.lstrip().startswith(("%", "!")) else line
                               for line in source.splitlines()))


def _calls_outside_try(tree, names: set) -> list:
    """Calls of ``names`` in ``tree`` not inside a ``try`` that catches NotImplementedError."""
    import ast

    found = []

    def visit(node, guarded):
        if isinstance(node, ast.Try):
            caught = any(h.type is None or "NotImplementedError" in ast.unparse(h.type) for h in node.handlers)
            for child in node.body:
                visit(child, guarded or caught)
            for child in node.handlers + node.orelse + node.finalbody:
                visit(child, guarded)
            return
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names and not guarded:
            found.append(node.func.id)
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_run_all_goes_through_with_the_stubs_unwritten(path):
    """In a lecture the exercises are open: a function the student has yet to write raises
    NotImplementedError, so only its check (which reports "not written yet") or a cell that
    catches NotImplementedError may call it; otherwise Run all stops there."""
    import ast

    stubs: set = set()
    for i, cell in enumerate(read(path).cells):
        if cell.cell_type != "code":
            continue
        tree = _python(cell.source)
        called = _calls_outside_try(tree, stubs)
        assert not called, f"{path.name}, cell {i}: calls {sorted(set(called))}, a stub the student may not have written"
        if "raise NotImplementedError" in cell.source:
            stubs |= {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


def test_students_write_the_core_of_the_course():
    written = sum(len(four_cell_exercises(read(p), WRITE)) for p in NOTEBOOKS)
    derived = sum(len(four_cell_exercises(read(p), DERIVATION)) for p in NOTEBOOKS)
    assert written >= 12, f"{written} exercises the student writes; the course asks for at least 12"
    assert derived >= 4, f"{derived} pen-and-paper derivations; the course asks for at least 4"


def test_checks_never_stop_a_notebook_unless_strict(monkeypatch, capsys):
    def stub():
        raise NotImplementedError("slerp: write it")

    monkeypatch.delenv(checks.STRICT_ENV, raising=False)
    assert checks.base.compare("stub", stub, 1.0, 1e-6).status == "not written"
    assert checks.base.compare("crash", lambda: 1 / 0, 1.0, 1e-6).status == "wrong"
    wrong = checks.check_value("a number", 2.5, 2.0, 1e-6)
    assert wrong.status == "wrong" and wrong.error == pytest.approx(0.5)
    assert checks.check_value("a number", ..., 2.0, 1e-6).status == "not written"
    assert "✗ wrong" in capsys.readouterr().out
    monkeypatch.setenv(checks.STRICT_ENV, "1")
    with pytest.raises(checks.CheckFailed, match="not written"):
        checks.base.compare("stub", stub, 1.0, 1e-6)
    with pytest.raises(checks.CheckFailed, match="wrong"):
        checks.check_value("a number", 2.5, 2.0, 1e-6)
    assert checks.check_value("a number", 2.0 + 1e-9, 2.0, 1e-6)


def test_shapes_that_differ_are_wrong_not_broadcast(monkeypatch):
    monkeypatch.delenv(checks.STRICT_ENV, raising=False)
    result = checks.base.compare("shape", lambda: [1.0, 1.0], [[1.0, 1.0]], 1e-6)
    assert result.status == "wrong" and "shape" in result.hint


@pytest.mark.parametrize("value, expected", [("classroom", "classroom"), ("tiny", "tiny"),
                                             ("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
                                             ("someone/their-model", "someone/their-model")])
def test_the_model_override_decides_the_notebooks_model(monkeypatch, value, expected):
    monkeypatch.setenv(MODEL_ENV, value)
    assert notebook_model_name() == expected
    monkeypatch.delenv(MODEL_ENV)
    assert notebook_model_name() in ("classroom", "tiny", "stable-diffusion-v1-5/stable-diffusion-v1-5")
