"""The README's two commands are the ones CI runs."""

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
