"""Rebuild the lessons' shipped stage caches: ``data/stage_caches/<NN>/*.pt`` and ``manifest.json``.

    python data/stage_caches/build.py 05 06 08 09 10 11

Executes each lesson (``notebooks/<NN>_*.ipynb``) in full mode on this machine, as
docs/prepare.py executes it for the site (nbclient, the inline backend, the hidden solutions
run), with ``IMPUS_LITE_BUILD_LESSON_CACHES=1``: :func:`impus_lite.cache.lesson_cache` then hands
the lesson the shipped folder itself, so every stage output it computes (text embeddings,
adapters, inverted codes, rPPD probes of the bundled pairs, on the classroom model; the frames
its ``Morpher.render`` calls sample; its whole results, with the costs they recorded) lands there.
The folder is emptied first. The executed notebook is kept in build/executed-full (the site
build reuses it). ``manifest.json`` records the classroom model's fingerprint (a retrained model
makes every key miss: ``tests/test_lesson_caches.py`` fails until the caches are rebuilt), each
file's size and SHA-256, and how long each lesson took to build.

A shipped file is only ever loaded by a stage whose key matches: its images, prompt, model,
dtype and every setting it reads (:func:`impus_lite.cache.stage_key`). A lesson edited since the
build still runs; its changed stages compute instead of loading, and its cache report says so.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "manifest.json"


def site_prepare():
    spec = importlib.util.spec_from_file_location("site_prepare", ROOT / "docs" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(lessons: list[str]) -> dict:
    import nbformat

    from impus_lite import load_model
    from impus_lite.cache import LESSON_CACHE_BUILD_ENV
    from impus_lite.runtime import cpu_model_name

    os.environ.pop("IMPUS_LITE_SMOKE", None)
    os.environ.pop("IMPUS_LITE_MODEL", None)
    os.environ[LESSON_CACHE_BUILD_ENV] = "1"
    prepare = site_prepare()
    built = {}
    for lesson in lessons:
        notebooks = sorted((ROOT / "notebooks").glob(f"{lesson}_*.ipynb"))
        if len(notebooks) != 1:
            raise SystemExit(f"no single notebook numbered {lesson} in notebooks/")
        folder = HERE / lesson
        folder.mkdir(exist_ok=True)
        for old in folder.rglob("*.pt"):
            old.unlink()
        start = time.perf_counter()
        executed = prepare.execute(notebooks[0])
        seconds = time.perf_counter() - start
        out = ROOT / "build" / "executed-full"
        out.mkdir(parents=True, exist_ok=True)
        nbformat.write(executed, out / notebooks[0].name)
        files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256(p)}
                 for p in sorted(folder.rglob("*.pt"))}
        built[lesson] = {"notebook": notebooks[0].name, "build_seconds": round(seconds, 1), "files": files}
        print(f"{lesson}: {len(files)} stage outputs, "
              f"{sum(f['bytes'] for f in files.values()) / 2**20:.1f} MiB, built in {seconds:.0f} s")
    # Read only now: another build may have written other lessons meanwhile.
    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.is_file() else {"lessons": {}}
    manifest.update(model="classroom", fingerprint=load_model("classroom").fingerprint,
                    machine=f"{cpu_model_name()}, {os.cpu_count()} CPUs")
    manifest["lessons"].update(built)
    MANIFEST.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: python data/stage_caches/build.py NN [NN ...]  (lesson numbers, e.g. 05 06)")
    build(sys.argv[1:])
