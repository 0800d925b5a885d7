"""Lay out the course site's Sphinx source: the executed lessons and the pages beyond them.

    python docs/prepare.py SOURCE_DIR

1. Every notebook in notebooks/ is executed as tests/test_notebooks.py executes it: nbclient,
   the ``python3`` kernel, matplotlib's inline backend, from inside notebooks/, each hidden
   solution's code run right after its exercise. ``IMPUS_LITE_SMOKE=1`` gives the fast build;
   without it the notebooks run in full mode (the classroom model on a machine without a GPU).
   An executed copy is reused instead when one exists in ``IMPUS_LITE_EXECUTED_DIR`` (default
   build/executed-smoke or build/executed-full) and its stamp names the same notebook bytes and
   the same mode: the notebook test writes such copies (it stamps them with ``stamp``), so CI
   executes each notebook once for the test and the site together.
2. For the page, the solution cells that were added are dropped again (the ``<details>`` block
   that holds each solution stays, collapsed), each ipywidgets view is replaced by what it
   showed when the cell ran (an Image widget's picture, an Output widget's outputs, one line
   naming the controls: a static page has no kernel to move them), and the Colab badge points
   to a copy in _static, so that a page needs nothing from the network.
3. The pages beyond the lessons are copied from docs/pages, and the course map is written from
   the notebooks themselves: title, "You will learn to" list and **Runtime.** paragraph.
"""

from __future__ import annotations

import base64
import hashlib
import html
import os
import re
import shutil
import sys
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
NOTEBOOK_DIR = ROOT / "notebooks"
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"
CELL_TIMEOUT_S = 600 if os.environ.get("IMPUS_LITE_SMOKE") == "1" else 3600
SOLUTION = re.compile(r"<details>.*?```python\n(.*?)```.*?</details>", re.S)  # as in the test
BADGE_URL = "https://colab.research.google.com/assets/colab-badge.svg"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
STAMP_KEY = "impus_lite_execution"


def is_smoke() -> bool:
    return os.environ.get("IMPUS_LITE_SMOKE", "").strip().lower() in ("1", "true", "yes")


def source_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def stamp(notebook, path: Path, smoke: bool) -> None:
    """Record in ``notebook`` which notebook file it is an execution of, and in which mode."""
    notebook.metadata[STAMP_KEY] = {"notebook": Path(path).name, "source_sha256": source_sha256(path),
                                    "smoke": bool(smoke)}


def with_solutions(notebook):
    """A copy in which every hidden solution's code runs as a code cell placed right after its
    ``<details>`` cell, tagged ``solution`` (the same transformation as the notebook test's)."""
    out = nbformat.v4.new_notebook(metadata=notebook.metadata)
    for cell in notebook.cells:
        out.cells.append(cell)
        if cell.cell_type == "markdown":
            for code in SOLUTION.findall(cell.source):
                out.cells.append(nbformat.v4.new_code_cell(code, metadata={"tags": ["solution"]}))
    return out


def executed_dir() -> Path:
    default = ROOT / "build" / ("executed-smoke" if is_smoke() else "executed-full")
    return Path(os.environ.get("IMPUS_LITE_EXECUTED_DIR") or default)


def reusable(path: Path, copy: Path) -> bool:
    if not copy.is_file():
        return False
    found = nbformat.read(copy, as_version=4).metadata.get(STAMP_KEY, {})
    return found.get("source_sha256") == source_sha256(path) and found.get("smoke") == is_smoke()


def execute(path: Path):
    from nbclient import NotebookClient

    os.environ["MPLBACKEND"] = INLINE_BACKEND
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["IMPUS_LITE_STRICT_CHECKS"] = "1"  # the solutions run: every check must say right
    notebook = with_solutions(nbformat.read(path, as_version=4))
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            store_widget_state=True, resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()
    stamp(notebook, path, is_smoke())
    return notebook


# ---- widgets: what a view showed, without a kernel ------------------------------------------

def _state(notebook) -> dict:
    return notebook.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})


def _buffer(widget: dict, key: str):
    for buffer in widget.get("buffers", []):
        if buffer.get("path") == [key]:
            return base64.b64decode(buffer["data"])
    return None


def _static(model_id: str, state: dict, controls: list, outputs: list) -> None:
    widget = state.get(model_id)
    if widget is None:
        return
    name, s = widget.get("model_name", ""), widget.get("state", {})
    for child in s.get("children", []):
        _static(str(child).replace("IPY_MODEL_", ""), state, controls, outputs)
    if name == "ImageModel":
        data = _buffer(widget, "value")
        if data is None and isinstance(s.get("value"), str):
            data = base64.b64decode(s["value"])
        if data:
            fmt = s.get("format", "png")
            mime = "image/png" if fmt == "png" else f"image/{fmt}"
            outputs.append(nbformat.v4.new_output("display_data", data={
                mime: base64.b64encode(data).decode("ascii"), "text/plain": "<image>"}))
    elif name == "OutputModel":
        outputs.extend(nbformat.from_dict(o) for o in s.get("outputs", []))
    elif name == "LabelModel" or name == "HTMLModel":
        if s.get("value"):
            controls.append(html.escape(str(s["value"])) if name == "LabelModel" else s["value"])
    elif "Slider" in name or name in ("DropdownModel", "TextModel", "FileUploadModel", "CheckboxModel"):
        label = s.get("description") or name.replace("Model", "").lower()
        if "options" in s or "_options_labels" in s:
            options = s.get("_options_labels") or s.get("options") or []
            index = s.get("index")
            value = options[index] if isinstance(index, int) and index < len(options) else ""
            if "Slider" in name and options:
                value = f"{value} (of {options[0]} ... {options[-1]})"
        elif "Slider" in name:
            value = f"{s.get('value')} (of {s.get('min')} ... {s.get('max')})"
        elif name == "FileUploadModel":
            value = "a file chooser"
        else:
            value = s.get("value", "")
        controls.append(f"{html.escape(str(label))}: {html.escape(str(value))}")


def _is_progress_bar(model_id: str, state: dict) -> bool:
    widget = state.get(model_id, {})
    children = [str(c).replace("IPY_MODEL_", "") for c in widget.get("state", {}).get("children", [])]
    return (widget.get("model_name", "").endswith("ProgressModel")
            or any(_is_progress_bar(c, state) for c in children))


def static_widgets(notebook) -> int:
    """Replace every widget view in the outputs by what it showed; returns how many."""
    state, replaced = _state(notebook), 0
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        new = []
        for output in cell.get("outputs", []):
            view = output.get("data", {}).get(WIDGET_VIEW)
            if view is None:
                new.append(output)
                continue
            if _is_progress_bar(view.get("model_id", ""), state):
                replaced += 1  # tqdm's bar: nothing to show once the cell has run
                continue
            controls, shown = [], []
            _static(view.get("model_id", ""), state, controls, shown)
            note = ("<p class=\"static-widget\"><strong>Interactive widget</strong> (it needs a running "
                    "kernel: open this notebook in JupyterLab, Colab or Binder to use it). "
                    + ("Shown as it was when the cell ran: " + "; ".join(controls) + "." if controls
                       else "Shown as it was when the cell ran.") + "</p>")
            new.append(nbformat.v4.new_output("display_data", data={"text/html": note,
                                                                     "text/plain": "widget"}))
            new.extend(shown)
            replaced += 1
        cell.outputs = new
    notebook.metadata.pop("widgets", None)
    return replaced


def for_the_site(notebook):
    """The executed notebook as a page shows it: no added solution cells, static widgets, the
    Colab badge from _static."""
    notebook.cells = [c for c in notebook.cells if "solution" not in c.metadata.get("tags", [])]
    static_widgets(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            cell.source = cell.source.replace(BADGE_URL, "/_static/colab-badge.svg")
    notebook.metadata.pop(STAMP_KEY, None)
    return notebook


# ---- the course map --------------------------------------------------------------------------

def _before(text: str, marker: str) -> str:
    """The phrase right before ``marker`` in ``text`` (back to the last colon, comma or
    semicolon), with parentheses dropped: "about 7 minutes" from "...: about 7 minutes (394 s
    measured) in full mode"."""
    flat = re.sub(r"\s*\([^()]*\)", "", text)
    found = re.search(r"([^:,;]*?)\s+(?:measured\s+)?" + marker, flat)
    return found.group(1).strip() if found else ""


def lesson_facts(path: Path) -> dict:
    """Title, learning goals, lecture length and the CPU / T4 times of one notebook, from its
    own text: the first heading, the "You will learn to" list, the **Lecture plan.** ("About N
    minutes ...") and the one-line **Runtime.** note ("...: X in full mode, Y with the shipped
    stage cache, ... Colab T4 ...: Z, an estimate ...")."""
    notebook = nbformat.read(path, as_version=4)
    markdown = [c.source for c in notebook.cells if c.cell_type == "markdown"]
    title = markdown[0].splitlines()[0].lstrip("# ").strip()
    number, _, name = title.partition(" · ")
    goals = next((s for s in markdown[:5] if s.startswith("**You will learn")), "")
    goals = [g.strip() for g in re.split(r"\n- ", goals)[1:]]
    goals = [re.sub(r"\s*\n\s*", " ", g).rstrip(".; ") for g in goals]
    runtime = next(s for s in markdown[:6] if s.startswith("**Runtime.**"))
    plan = next((s for s in markdown[:6] if s.startswith("**Lecture plan.**")), "")
    cpu_part, _, t4_part = runtime.partition("T4")
    t4 = re.search(r"^[^:]*:\s*([^,(;]*)", t4_part)
    if t4:
        t4_text = t4.group(1).strip().rstrip(".") + " (estimate, Stable Diffusion 1.5)"
    elif re.search(r"no (?:diffusion )?model|leave the runtime on CPU", runtime):
        t4_text = "the same as on a CPU (no diffusion model; no GPU needed)"
    else:
        t4_text = "see the notebook"
    lecture = re.search(r"About (\d+) minutes", plan)
    return {"stem": path.stem, "number": number.strip(), "name": name.strip() or title,
            "goals": goals, "cpu": _before(cpu_part, "in full mode") or "see the notebook",
            "cached": _before(cpu_part, "with the shipped stage cache") or "",
            "t4": t4_text, "lecture": f"{lecture.group(1)} min" if lecture else "",
            "plan": plan.replace("**Lecture plan.**", "").strip(),
            "runtime": runtime.replace("**Runtime.**", "").strip()}


def course_map(paths) -> str:
    facts = [lesson_facts(p) for p in paths]
    lines = [
        "# Course map",
        "",
        "The lessons in order. Each teaches one idea and is backed by one tested module of",
        "`impus_lite`; notebooks 07 to 11 put the modules together. Each opens with a lecture",
        "plan (what to run live and for how long) and closes with its takeaways. Times come from",
        "the **Runtime.** line at the top of each notebook: on a CPU in full mode with the",
        "classroom model and the default threads (one torch thread in each of two batch workers),",
        "measured on a 2-core AMD EPYC (Zen 5); with the shipped stage cache, as",
        "a lecture runs it (Run all, solutions folded; lessons that train load their embeddings,",
        "adapters, codes, sampled frames and whole morphs from data/stage_caches);",
        "on a Colab T4 with Stable Diffusion 1.5, estimated from the UNet evaluations each notebook",
        "makes (about 2.5 a second). Smoke mode (`IMPUS_LITE_SMOKE=1`) runs every notebook in",
        "under a minute on that CPU.",
        "",
        "| # | lesson | lecture | CPU, full mode | CPU, shipped stage cache | Colab T4 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for f in facts:
        lines.append(f"| {f['number']} | [{f['name']}](lessons/{f['stem']}.ipynb) | {f['lecture'] or '-'} "
                     f"| {f['cpu']} | {f['cached'] or '-'} | {f['t4']} |")
    lines += ["", "## What each lesson teaches", ""]
    for f in facts:
        lines += [f"### {f['number']} · {f['name']}", "",
                  f"[Open the lesson](lessons/{f['stem']}.ipynb). You will learn to:", ""]
        lines += [f"- {g};" if i < len(f["goals"]) - 1 else f"- {g}." for i, g in enumerate(f["goals"])]
        lines += ["", f"*Runtime.* {f['runtime']}", ""]
        if f["plan"]:
            lines += ["*Lecture plan.*", "", f["plan"], ""]
    return "\n".join(lines) + "\n"


# ---- the API reference ----------------------------------------------------------------------

FAMILIES = ("methods", "metrics", "checks", "classroom")
API_GROUPS = [
    ("Stage modules and tools", lambda m: m.count(".") == 1 and m.split(".")[1] not in FAMILIES),
    ("Methods: IMPUS and its neighbours", lambda m: m.split(".")[1:2] == ["methods"]),
    ("Metrics: the published conventions", lambda m: m.split(".")[1:2] == ["metrics"]),
    ("Exercise checks: what the lessons' exercises are checked against", lambda m: m.split(".")[1:2] == ["checks"]),
    ("The classroom model", lambda m: m.split(".")[1:2] == ["classroom"]),
]


def modules() -> list:
    """Every module of the package, found on disk (so that a new one gets its section)."""
    names = set()
    for path in (ROOT / "impus_lite").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] != "__main__":
            names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(names, key=lambda m: (m.count("."), m))


def api_page() -> str:
    names = modules()
    lines = ["# API reference", "",
             "Generated from the docstrings of the `impus_lite` package, one section per module.",
             "Start with `load_model`, `morph` and `MorphConfig`, which the package exports:", "",
             "```{eval-rst}", ".. automodule:: impus_lite", "   :no-members:", "```", ""]
    for title, belongs in API_GROUPS:
        lines += [f"## {title}", ""]
        for name in (m for m in names if m != "impus_lite" and belongs(m)):
            package = (ROOT / Path(*name.split(".")) / "__init__.py").is_file()
            lines += [f"### `{name}`", "", "```{eval-rst}", f".. automodule:: {name}",
                      *(["   :no-members:"] if package else []), "```", ""]
    return "\n".join(lines) + "\n"


# ---- the whole source tree -------------------------------------------------------------------

def main(source: Path) -> None:
    if source.exists():
        shutil.rmtree(source)
    (source / "lessons").mkdir(parents=True)
    shutil.copytree(DOCS / "pages", source, dirs_exist_ok=True)
    shutil.copytree(DOCS / "_static", source / "_static")
    shutil.copytree(DOCS / "figures", source / "figures")
    shutil.copy(DOCS / "conf.py", source / "conf.py")
    paths = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
    (source / "course.md").write_text(course_map(paths))
    (source / "api.md").write_text(api_page())
    cache = executed_dir()
    cache.mkdir(parents=True, exist_ok=True)
    mode = "smoke" if is_smoke() else "full"
    for path in paths:
        copy = cache / path.name
        start = time.perf_counter()
        if reusable(path, copy):
            notebook, how = nbformat.read(copy, as_version=4), "reused"
        else:
            notebook, how = execute(path), f"executed ({mode} mode)"
            nbformat.write(notebook, copy)
        nbformat.write(for_the_site(notebook), source / "lessons" / path.name)
        print(f"{path.name}: {how} in {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.splitlines()[2].strip())
    main(Path(sys.argv[1]).resolve())
