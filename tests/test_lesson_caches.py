"""The lessons' shipped stage caches: built for the shipped classroom model, intact, and loaded.

data/stage_caches/<NN>/ holds stage outputs that data/stage_caches/build.py computed by running
lesson NN in full mode; impus_lite.cache.lesson_cache copies them into a lesson's cache folder.
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from impus_lite import cache as cache_module
from impus_lite import morph
from impus_lite.cache import cache_report, lesson_cache

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "data" / "stage_caches"
MANIFEST = SHIPPED / "manifest.json"


def manifest():
    if not MANIFEST.is_file():
        pytest.fail("data/stage_caches/manifest.json is missing: run data/stage_caches/build.py")
    return json.loads(MANIFEST.read_text())


def test_shipped_caches_were_built_for_the_shipped_classroom_model():
    from impus_lite import load_model

    assert manifest()["fingerprint"] == load_model("classroom").fingerprint, (
        "the classroom model changed since the lesson caches were built: every shipped key misses; "
        "rebuild them with data/stage_caches/build.py")


def test_shipped_cache_files_are_the_ones_built_and_load_without_pickles():
    lessons = manifest()["lessons"]
    assert lessons, "no lesson has a shipped cache"
    for lesson, entry in lessons.items():
        notebook = ROOT / "notebooks" / entry["notebook"]
        assert notebook.is_file(), f"lesson {lesson}: {entry['notebook']} no longer exists"
        code = "\n".join("".join(c["source"]) for c in json.loads(notebook.read_text())["cells"])
        assert f'lesson_cache("{lesson}")' in code, (
            f"{entry['notebook']} does not use its shipped cache (lesson_cache(\"{lesson}\"))")
        folder = SHIPPED / lesson
        on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*.pt")}
        assert on_disk == set(entry["files"]), f"lesson {lesson}: files differ from the manifest"
        for name, facts in entry["files"].items():
            data = (folder / name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == facts["sha256"], f"{lesson}/{name} changed"
            value = torch.load(folder / name, map_location="cpu", weights_only=True)
            assert isinstance(value, dict) and value, f"{lesson}/{name} is not a dict of tensors"


def test_a_lesson_cache_seeds_a_fresh_folder_that_a_matching_morph_loads(
        tiny_model, image_pair, tiny_config, lpips, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cache_module, "LESSON_CACHE_DIR", tmp_path / "shipped")
    monkeypatch.setenv(cache_module.LESSON_CACHE_BUILD_ENV, "1")
    built = lesson_cache("99")
    assert built == tmp_path / "shipped" / "99"
    first = morph(tiny_model, *image_pair, "a photo", tiny_config, cache_dir=built, lpips=lpips, progress=False)
    assert not any(s.cached for s in first.stats.values())
    cache_module.StageCache(built / "bench").save("result", "0" * 64, {"x": torch.ones(1)})
    shipped = sorted(p.relative_to(built).as_posix() for p in built.rglob("*.pt"))
    assert len(shipped) > 1 and "bench/result-" + "0" * 24 + ".pt" in shipped

    monkeypatch.delenv(cache_module.LESSON_CACHE_BUILD_ENV)
    seeded = lesson_cache("99", tmp_path / "lecture")
    assert "copied" in capsys.readouterr().out
    assert sorted(p.relative_to(seeded).as_posix() for p in seeded.rglob("*.pt")) == shipped
    again = morph(tiny_model, *image_pair, "a photo", tiny_config, cache_dir=seeded, lpips=lpips, progress=False)
    assert again.loaded and again.unet_evals == first.unet_evals > 0    # the whole morph, as built
    assert (again.images - first.images).abs().max() <= 1 / 127.5
    # Other sampling settings: the training stages load, the frames are sampled.
    resampled = morph(tiny_model, *image_pair, "a photo", tiny_config.replace(max_guidance=5.0),
                      cache_dir=seeded, lpips=lpips, progress=False)
    trained = [s for s in ("text", "lora") if s in resampled.stats]
    assert not resampled.loaded and len(trained) == 2
    assert all(resampled.stats[s].cached and resampled.stats[s].unet_evals == 0 for s in trained)
    assert resampled.stats["frames"].unet_evals > 0

    other = lesson_cache("98", tmp_path / "empty")
    assert not list(other.glob("*.pt")) and "nothing shipped" in capsys.readouterr().out


def test_cache_report_counts_loads_and_computations():
    hit, miss = cache_module.StageCache(None), cache_module.StageCache(None)
    hit.hits += ["text", "text", "cond_lora"]
    miss.misses += ["inversion"]
    line = cache_report([hit, miss])
    assert "text x2" in line and "cond_lora x1" in line and "Computed: inversion x1" in line


def test_cache_report_reads_results_by_their_stage_flags():
    from types import SimpleNamespace

    result = SimpleNamespace(stats={"text": SimpleNamespace(cached=True), "frames": SimpleNamespace(cached=False)})
    assert cache_report([result]) == "Loaded from the stage cache: text x1. Computed: frames x1."
