"""A content-keyed cache of stage outputs (embeddings, adapters, inverted codes).

A key is the SHA-256 of everything a stage's output depends on: the image contents (not their
file names), the prompt, the model's fingerprint and the config fields the stage reads, chained
with the keys of the stages it builds on. A changed image therefore never reuses stale results,
and a rerun that only changes sampling settings skips the training stages. Files are written to
a temporary name and renamed (atomic on POSIX and Windows), so an interrupted run leaves either
the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
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
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            torch.save(value, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
