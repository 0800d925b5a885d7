"""A content-keyed cache of stage outputs (embeddings, adapters, inverted codes, rendered frames,
whole results).

A key is the SHA-256 of everything a stage's output depends on: the image contents (not their
file names), the prompt, the model's fingerprint and the config fields the stage reads, chained
with the keys of the stages it builds on. A changed image therefore never reuses stale results,
and a rerun that only changes sampling settings skips the training stages. Files are written to
a temporary name and renamed (atomic on POSIX and Windows), so an interrupted run leaves either
the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Optional, Union

import torch


def stage_key(stage: str, **parts: Any) -> str:
    """Hex key of a stage from JSON-serialisable parts (floats, ints, strings, other keys)."""
    text = json.dumps({"stage": stage, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class StageCache:
    """Stage outputs as ``<folder>/<stage>-<key[:24]>.pt`` (torch.save of a dict of tensors).

    ``folder=None`` disables caching (every lookup misses, nothing is written).
    """

    def __init__(self, folder: Union[str, Path, None]):
        self.folder = Path(folder) if folder is not None else None
        self.hits: list[str] = []
        self.misses: list[str] = []

    def path(self, stage: str, key: str) -> Optional[Path]:
        return None if self.folder is None else self.folder / f"{stage}-{key[:24]}.pt"

    def load(self, stage: str, key: str) -> Optional[dict]:
        """The stored dict, or None when absent (or unreadable, e.g. from an older version)."""
        path = self.path(stage, key)
        if path is not None and path.is_file():
            try:
                value = torch.load(path, map_location="cpu", weights_only=True)
                self.hits.append(stage)
                return value
            except Exception:
                pass
        self.misses.append(stage)
        return None

    def save(self, stage: str, key: str, value: dict) -> None:
        """Write ``value`` atomically (temporary file in the same folder, then rename)."""
        path = self.path(stage, key)
        if path is None:
            return
        with _written_atomically(path) as tmp:
            torch.save(value, tmp)


#: os.umask can only be read by setting it; threads that write files take turns doing so.
_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    with _UMASK_LOCK:
        umask = os.umask(0)
        os.umask(umask)
    return umask


@contextlib.contextmanager
def _written_atomically(path: Path):
    """A temporary file beside ``path`` to write to: when the block ends without an error it gets
    the mode a plain ``open(..., "w")`` would (``mkstemp`` makes it readable by its owner only)
    and replaces ``path``; otherwise it is removed and ``path`` stays as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    with _written_atomically(path) as tmp:
        Path(tmp).write_bytes(data)
    return path


def cached_result(folder: Union[str, Path, None], key: str, compute, device=None):
    """A whole morph from ``<folder>/result-<key[:24]>.pt``, or ``compute()`` stored there.

    ``key``: a :func:`stage_key` of everything the result depends on (see
    :func:`impus_lite.methods.result_key`). A loaded :class:`~impus_lite.result.MorphResult`
    has ``loaded`` set and keeps what the run that computed it recorded: its stats (seconds and
    UNet evaluations per stage), threads and a note naming that run's machine and date, so
    cost tables read the same whether a result was computed or loaded. ``folder=None``: always
    ``compute()``. ``device``: where it runs (named in the stored note; default the CPU).
    """
    from datetime import date

    from .result import MorphResult
    from .runtime import machine_description

    cache = StageCache(folder)
    state = cache.load("result", key)
    if state is not None:
        result = MorphResult.from_state(state)
        result.notes.append(f"loaded whole from the result cache: computed on {state['machine']}, "
                            f"{state['date']}; its seconds and stage costs are that run's")
        return result
    result = compute()
    if folder is not None:
        cache.save("result", key, {**result.to_state(), "machine": machine_description(torch.device(device or "cpu")),
                                   "date": date.today().isoformat()})
    return result


#: Where the lessons' shipped stage outputs live: ``data/stage_caches/<lesson>/``.
LESSON_CACHE_DIR = Path(__file__).resolve().parent.parent / "data" / "stage_caches"
#: Environment variable: "1" makes :func:`lesson_cache` write into the shipped folder itself
#: (how ``data/stage_caches/build.py`` rebuilds them).
LESSON_CACHE_BUILD_ENV = "IMPUS_LITE_BUILD_LESSON_CACHES"


def lesson_cache(lesson: str, folder: Union[str, Path, None] = None) -> Path:
    """A stage-cache folder for a lesson, seeded with the stage outputs shipped for it.

    The shipped files (``data/stage_caches/<lesson>/*.pt``: text embeddings, adapters, inverted
    codes of the bundled pairs, the frames its ``Morpher.render`` calls sampled and its whole
    results, computed with the lesson's full-mode settings on the classroom model; subfolders
    too, e.g. a ``bench`` folder of runs measured without a stage cache) are copied into
    ``folder`` (default: a new temporary folder), so the lesson can write beside them without
    touching the repository. Keys are content hashes
    (:func:`stage_key`), so a stage whose image, prompt, model or settings differ never loads a
    shipped file: it runs, as it would without them. Prints what was copied.
    """
    import shutil

    shipped = LESSON_CACHE_DIR / lesson
    if os.environ.get(LESSON_CACHE_BUILD_ENV, "").strip() == "1":
        shipped.mkdir(parents=True, exist_ok=True)
        print(f"Writing this lesson's stage outputs into {shipped} (rebuilding the shipped cache).")
        return shipped
    target = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix=f"impus_lite_{lesson}_"))
    target.mkdir(parents=True, exist_ok=True)
    files = sorted(shipped.rglob("*.pt")) if shipped.is_dir() else []
    counts: dict = {}
    for path in files:
        copy = target / path.relative_to(shipped)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, copy)
        stage = path.name.rsplit("-", 1)[0]
        counts[stage] = counts.get(stage, 0) + 1
    if files:
        size = sum(p.stat().st_size for p in files) / 2**20
        listed = ", ".join(f"{stage} x{n}" for stage, n in counts.items())
        print(f"Stage cache: {len(files)} shipped stage outputs ({size:.1f} MiB: {listed}) copied to "
              f"{target}; a stage whose inputs and settings match loads instead of running.")
    else:
        print(f"Stage cache: {target} (nothing shipped for {lesson}: every stage runs).")
    return target


def cache_report(sources) -> str:
    """One line: which stages loaded from a cache and which ran.

    ``sources``: :class:`StageCache` objects (``[morpher.cache for morpher in ...]``: every
    lookup, by stage) and/or results with ``stats`` (:class:`impus_lite.MorphResult`: each stage
    counted once, loaded when its ``cached`` flag is set; a result loaded whole counts as one
    "result").
    """
    hits: dict = {}
    misses: dict = {}
    for source in sources:
        if hasattr(source, "hits"):
            loaded, computed = source.hits, source.misses
        elif getattr(source, "loaded", False):
            loaded, computed = ["result"], []
        else:
            loaded = [stage for stage, stats in source.stats.items() if stats.cached]
            computed = [stage for stage, stats in source.stats.items() if not stats.cached]
        for stage in loaded:
            hits[stage] = hits.get(stage, 0) + 1
        for stage in computed:
            misses[stage] = misses.get(stage, 0) + 1
    loaded = ", ".join(f"{s} x{n}" for s, n in hits.items()) or "nothing"
    ran = ", ".join(f"{s} x{n}" for s, n in misses.items()) or "nothing"
    return f"Loaded from the stage cache: {loaded}. Computed: {ran}."
