"""``morph()``: the public entry point, above the methods family.

    from impus_lite import load_model, morph, MorphConfig
    result = morph(model, "cat.png", "dog.png", prompt="a photo of an animal",
                   config=MorphConfig.preset("fast", method="diffmorpher"))

It hands the pair to the method that ``config.method`` names (:mod:`impus_lite.methods`):
"impus" runs :class:`impus_lite.morph.Morpher`, IMPUS's pipeline; the others run their own
modules. Every method returns the same :class:`~impus_lite.result.MorphResult`. Dependencies
point down: this module imports the methods family, which imports the stage modules and
:mod:`impus_lite.morph`; none of them imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from .config import MorphConfig
from .images import ImageLike
from .methods import run_method
from .models import DiffusionModel
from .perceptual import Lpips
from .result import MorphResult


def morph(model: DiffusionModel, image0: ImageLike, image1: ImageLike, prompt: str,
          config: Optional[MorphConfig] = None, cache_dir: Union[str, Path, None] = None,
          lpips: Optional[Lpips] = None, progress: bool = True,
          results_dir: Union[str, Path, None, bool] = True) -> MorphResult:
    """Morph ``image0`` into ``image1`` with ``config.method`` (default: the "fast" preset's
    "impus", every stage of :class:`impus_lite.morph.Morpher`).

    Args:
        model: a loaded :class:`DiffusionModel`.
        image0, image1: paths or PIL images (alpha = 0 and alpha = 1).
        prompt: what the two images share, e.g. "a photo of an animal".
        config: a :class:`MorphConfig`; None = ``MorphConfig.preset("fast")``.
        cache_dir: folder for stage outputs (None: no cache).
        results_dir: folder for whole results (True: ``cache_dir``; None: none): a morph whose
            images, prompt, config, model and LPIPS match a stored one loads it, with the costs
            its own run recorded (:func:`impus_lite.cache.cached_result`).
        lpips: the distance the alpha schedule measures (default: LPIPS-Alex, [-1, 1]).
    Returns:
        A :class:`MorphResult`: frames (K images), alphas (K floats from 0 to 1), distances
        (K - 1), cost per stage.
    """
    return run_method(model, image0, image1, prompt, config, cache_dir, lpips, progress, results_dir)


__all__ = ["morph"]
