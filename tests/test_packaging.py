"""What `pip install .` (not the editable install of a checkout) puts on a machine: the wheel holds
every module of the package, so that a non-editable install imports what the lessons import."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_every_module_and_the_architecture_files(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "impus_lite", source / "impus_lite", ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--no-index", "-q", "-w", str(tmp_path / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel, = (tmp_path / "dist").glob("impus_lite-*.whl")
    inside = set(zipfile.ZipFile(wheel).namelist())
    wanted = {p.relative_to(source).as_posix() for p in (source / "impus_lite").rglob("*")
              if p.suffix in (".py", ".json")}
    assert len(wanted) > 60
    assert not wanted - inside, f"missing from the wheel: {sorted(wanted - inside)}"
