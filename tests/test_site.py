"""The course site as a reader gets it: built by ``docs/build.sh`` in smoke mode, served on
127.0.0.1 and opened page by page in headless Chromium.

Every page loads, every image on it has a non-zero natural size, no cell shows an error, no page
asks for anything outside the site, and the exercises' solutions are folded. One lesson page is
saved as a screenshot (build/figures/site_lesson_page.png; with IMPUS_LITE_UPDATE_FIGURES=1 also
docs/figures/, where the site and the README show it).

The build reuses the notebooks that tests/test_notebooks.py executed when ``.ci/run`` sets
``IMPUS_LITE_EXECUTED_DIR`` (the notebook test runs first); otherwise it executes them itself.
"""

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import nbformat
import pytest

from browser import chromium, require_chromium

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SCREENSHOT = "site_lesson_page.png"
SCREENSHOT_LESSON = "07_full_morph"
PAGES_BEYOND_THE_LESSONS = ["index", "course", "running", "results", "methods", "model", "api"]
BUILD_TIMEOUT_S = 3600


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    require_chromium()
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "IMPUS_LITE_SMOKE": "1", "PYTHON": sys.executable,
           "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("MPLBACKEND", None)  # the notebooks get matplotlib's inline backend from prepare.py
    build = subprocess.run(["bash", str(ROOT / "docs" / "build.sh"), str(out)], env=env,
                           capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert build.returncode == 0, f"docs/build.sh failed:\n{build.stdout[-3000:]}\n{build.stderr[-6000:]}"
    return out


@pytest.fixture(scope="module")
def server(site):
    handler = functools.partial(QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def pages(site):
    return sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html")
                  if not p.relative_to(site).parts[0].startswith("_"))


def test_every_figure_in_docs_figures_is_on_a_page():
    pages = "\n".join(p.read_text() for p in (ROOT / "docs" / "pages").glob("*.md"))
    orphans = [f.name for f in (ROOT / "docs" / "figures").glob("*.png") if f"figures/{f.name}" not in pages]
    assert not orphans, f"figures no page of the site shows or links: {orphans}"


def test_the_build_writes_the_index_a_page_per_lesson_and_the_pages_beyond(site):
    built = set(pages(site))
    expected = {f"lessons/{p.stem}.html" for p in NOTEBOOKS} | {f"{p}.html" for p in PAGES_BEYOND_THE_LESSONS}
    assert not expected - built, f"missing pages: {sorted(expected - built)}"
    assert (site / ".nojekyll").is_file()


def test_every_page_loads_with_its_images_and_no_error(site, server):
    problems = []
    with chromium() as context:
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        for name in pages(site):
            errors.clear()
            response = page.goto(f"{server}/{name}", wait_until="load")
            if response is None or not response.ok:
                problems.append(f"{name}: HTTP {response.status if response else 'no response'}")
                continue
            page.evaluate("document.querySelectorAll('img[loading=lazy]').forEach(i => i.loading = 'eager')")
            page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=30_000)
            broken = page.evaluate("""Array.from(document.images)
                .filter(i => !(i.naturalWidth > 0 && i.naturalHeight > 0))
                .map(i => i.getAttribute('src'))""")
            if broken:
                problems.append(f"{name}: images with no size: {broken}")
            shown = page.locator(".output.traceback, .output.error, .system-message, .problematic")
            if shown.count():
                problems.append(f"{name}: {shown.count()} error output(s): {shown.first.inner_text()[:300]!r}")
            if "Traceback (most recent call last)" in page.inner_text("body"):
                problems.append(f"{name}: a traceback is shown")
            if errors:
                problems.append(f"{name}: JavaScript errors {errors}")
        assert not context.external, f"pages asked for files outside the site: {sorted(set(context.external))}"
    assert not problems, "\n".join(problems)


def test_lessons_show_their_figures_and_keep_solutions_folded(site, server):
    problems = []
    with chromium() as context:
        page = context.new_page()
        for path in NOTEBOOKS:
            notebook = nbformat.read(path, as_version=4)
            promised = notebook.metadata.get("impus_lite", {}).get("figures", 1)
            exercises = sum("<details>" in c.source for c in notebook.cells if c.cell_type == "markdown")
            page.goto(f"{server}/lessons/{path.stem}.html", wait_until="load")
            figures = page.locator(".cell_output img").count()
            if figures < promised:
                problems.append(f"{path.stem}: {figures} figures shown, the notebook promises {promised}")
            details = page.locator("article details")
            if details.count() < exercises:
                problems.append(f"{path.stem}: {details.count()} folded solutions, {exercises} in the notebook")
            opened = page.evaluate("Array.from(document.querySelectorAll('article details')).filter(d => d.open).length")
            if opened:
                problems.append(f"{path.stem}: {opened} solution(s) open")
            for i in range(details.count()):
                code = details.nth(i).locator("pre")
                if code.count() and code.first.is_visible():
                    problems.append(f"{path.stem}: the code of solution {i + 1} shows before it is opened")
            if details.count():  # a reader can open one and read the code
                details.first.locator("summary").click()
                if details.first.locator("pre").count() and not details.first.locator("pre").first.is_visible():
                    problems.append(f"{path.stem}: an opened solution shows no code")
    assert not problems, "\n".join(problems)


def test_widgets_are_shown_as_what_they_showed(site, server):
    with chromium() as context:
        page = context.new_page()
        page.goto(f"{server}/lessons/07_full_morph.html", wait_until="load")
        notes = page.locator("p.static-widget")
        assert notes.count() >= 2, "lesson 07's pair chooser and alpha slider should each leave a note"
        assert "frame" in page.inner_text("article"), "the alpha slider's note names its frame"
        body = page.content()
        assert "application/vnd.jupyter.widget-view+json" not in body and "VBox(children" not in body


def test_the_course_map_gives_every_lesson_in_order_with_its_times(site, server):
    with chromium() as context:
        page = context.new_page()
        page.goto(f"{server}/course.html", wait_until="load")
        rows = page.locator("article table").first.locator("tbody tr")
        assert rows.count() == len(NOTEBOOKS)
        numbers = [rows.nth(i).locator("td").first.inner_text().strip() for i in range(rows.count())]
        assert numbers == [p.stem[:2] for p in NOTEBOOKS]
        for i in range(rows.count()):
            lecture, cpu, t4 = (rows.nth(i).locator("td").nth(k).inner_text() for k in (2, 3, 5))
            assert re.search(r"\d+ min", lecture), f"lesson {numbers[i]}: no lecture length"
            assert re.search(r"\d", cpu) and t4 and "see the notebook" not in cpu + t4, numbers[i]
        page.goto(f"{server}/results.html", wait_until="load")
        assert page.locator("article table").count() >= 6, "the results page holds the measurement tables"


def test_a_lesson_page_screenshot_for_the_docs(site, server):
    target = ROOT / "build" / "figures" / SCREENSHOT
    target.parent.mkdir(parents=True, exist_ok=True)
    with chromium(viewport=(1280, 860)) as context:
        page = context.new_page()
        page.goto(f"{server}/lessons/{SCREENSHOT_LESSON}.html", wait_until="load")
        page.locator("h2", has_text="The frames").first.evaluate("h => h.scrollIntoView()")
        page.evaluate("window.scrollBy(0, -70)")
        page.screenshot(path=str(target))
    assert target.stat().st_size > 10_000
    if os.environ.get("IMPUS_LITE_UPDATE_FIGURES") == "1":
        shutil.copy(target, ROOT / "docs" / "figures" / SCREENSHOT)
