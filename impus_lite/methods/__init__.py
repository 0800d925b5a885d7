"""Morphing methods on one engine: IMPUS and its neighbours, one module each.

Every method takes the same inputs (a loaded model, two images, a prompt, a
:class:`~impus_lite.config.MorphConfig`) and returns the same
:class:`~impus_lite.result.MorphResult` (frames, alphas, distances, cost per stage), so the
CLI, the cache, export, ``evaluate`` and ``bench`` treat them alike.

    ========== ==============================================================================
    impus      this package's IMPUS pipeline (:class:`impus_lite.morph.Morpher`)
    slerp      DDIM inversion of both images, slerp of the codes, no training
    diffmorpher one LoRA per image, LoRA interpolation, AdaIN, attention interpolation
    wang-golland latent interpolation at a noise level that falls towards the ends
    aid        attention interpolation between the endpoints' trajectories (Beta-prior alphas)
    freemorph  attention guided by both inputs and blended over the steps (Beta(20, 20))
    ========== ==============================================================================
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Optional, Union

from ..config import METHODS, MorphConfig

_MODULES = {name: name.replace("-", "_") for name in METHODS}


def method_module(name: str):
    """The module that implements method ``name`` (one of :data:`~impus_lite.config.METHODS`)."""
    if name not in _MODULES:
        from ..errors import InputError
        raise InputError(f"Unknown method '{name}': use one of {', '.join(METHODS)}.")
    return importlib.import_module(f"{__name__}.{_MODULES[name]}")


def run_method(model, image0, image1, prompt: str, config: Optional[MorphConfig] = None,
               cache_dir: Union[str, Path, None] = None, lpips=None, progress: bool = True):
    """Morph ``image0`` into ``image1`` with ``config.method``; returns a MorphResult."""
    config = config or MorphConfig.preset("fast")
    return method_module(config.method).run(model, image0, image1, prompt, config, cache_dir,
                                            lpips, progress)


__all__ = ["METHODS", "method_module", "run_method"]
