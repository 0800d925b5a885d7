"""The README: its two commands are the ones CI runs, the files it names exist, it stays short,
and its links into the course site point at pages that docs/build.sh writes."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands():
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [b.strip() for b in blocks]


def test_ci_runs_the_readme_setup_and_test_commands_verbatim():
    commands = readme_commands()
    setup = next(c for c in commands if c.startswith("python3 -m venv"))
    tests = next(c for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    assert setup in ci.splitlines() and tests in ci.splitlines()


def test_files_the_readme_names_exist():
    text = (ROOT / "README.md").read_text()
    paths = re.findall(r"data/pairs/[\w/]+\.(?:png|jpg)|docs/figures/[\w.-]+\.png", text)
    assert any(p.startswith("docs/figures/") for p in paths)
    for path in paths:
        assert (ROOT / path).is_file(), path


def test_every_package_dependency_is_in_requirements_with_the_same_range():
    pyproject = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)\]", pyproject, re.S | re.M).group(1)
    package = re.findall(r'"([^"]+)"', block)
    requirements = {line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()}
    assert len(package) > 10
    assert [d for d in package if d not in requirements] == []


SITE_URL = "https://impus-lite.github.io/impus_lite/"
README_MAX_LINES = 150


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines: measurements and details belong on the site (docs/pages)")


def test_readme_links_to_pages_the_site_build_writes():
    text = (ROOT / "README.md").read_text()
    pages = re.findall(re.escape(SITE_URL) + r"([\w/.-]*?)\.html", text)
    assert {"index", "course", "results", "running"} <= set(pages)
    written = ({p.stem for p in (ROOT / "docs" / "pages").glob("*.md")} | {"course", "api"}
               | {f"lessons/{p.stem}" for p in (ROOT / "notebooks").glob("*.ipynb")})
    assert [p for p in pages if p not in written] == []
