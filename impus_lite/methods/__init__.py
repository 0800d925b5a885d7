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


#: The methods that give each image its own caption (:func:`.captions.image_captions`: a caption
#: file or the file name), which their results depend on beyond the pixels.
CAPTIONED_METHODS = ("diffmorpher", "aid", "freemorph")


def result_key(model, image0, image1, prompt: str, config: MorphConfig, lpips=None) -> str:
    """Content key of a whole morph: both images as the method reads them (cropped or resized
    to its size), the prompt, the images' captions for :data:`CAPTIONED_METHODS`, every config
    field (``method_options`` included), the model's fingerprint and the dtype it will run in,
    and the LPIPS trunk that places the frames."""
    from ..cache import stage_key
    from ..images import load_image, tensor_digest
    from ..models import autocast_dtype, run_dtype
    from .captions import image_captions

    size = config.size or model.resolution
    digests = [tensor_digest(load_image(image, size, config.resize_mode, config.resample))
               for image in (image0, image1)]
    dtype = run_dtype(model, config.precision)
    fields = config.to_dict()
    cast = autocast_dtype(model.device, fields.pop("autocast"))  # what it does on this machine
    if cast is not None:              # none: the key results had before the field existed
        fields["autocast"] = str(cast)
    captions = ({"captions": list(image_captions((image0, image1), prompt)[0])}
                if config.method in CAPTIONED_METHODS else {})
    return stage_key("result", images=digests, prompt=prompt, config=fields,
                     model=model.fingerprint, dtype=str(dtype),
                     lpips=getattr(lpips, "trunk", None) or "default", **captions)


def run_method(model, image0, image1, prompt: str, config: Optional[MorphConfig] = None,
               cache_dir: Union[str, Path, None] = None, lpips=None, progress: bool = True,
               results_dir: Union[str, Path, None, bool] = True):
    """Morph ``image0`` into ``image1`` with ``config.method``; returns a MorphResult.

    ``cache_dir`` keeps each stage's output; ``results_dir`` keeps whole results
    (:func:`impus_lite.cache.cached_result`): True (default) = ``cache_dir``, None = never.
    A morph whose images, prompt, config, model and LPIPS all match a stored one loads it.
    """
    from ..cache import cached_result

    config = config or MorphConfig.preset("fast")
    module = method_module(config.method)

    def compute():
        return module.run(model, image0, image1, prompt, config, cache_dir, lpips, progress)

    folder = cache_dir if results_dir is True else (results_dir or None)
    if folder is None:
        return compute()
    return cached_result(folder, result_key(model, image0, image1, prompt, config, lpips), compute, model.device)


__all__ = ["METHODS", "method_module", "result_key", "run_method"]
