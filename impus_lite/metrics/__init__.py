"""The published metric conventions of image morphing, by name, on one interface.

The papers use the same names for different computations; each convention lives in its own
module whose docstring states the equation, the frame count, the LPIPS input range, sums or
means, and the code or thread it follows (and what could not be confirmed):

    =========== ======================= ========= ==========================================
    name        numbers                 frames    needs
    =========== ======================= ========= ==========================================
    diffmorpher ppl (sum), pdv (var)    17        frames or render
    freemorph   lpips_sum, ppl_sum, fid 5 + 2     frames or render; inputs for fid
    impus       ppl (StyleGAN form)     any       render
    aid         smoothness, consistency any       frames (or render)
                max_distance
    fid         fid                     any       frames and inputs; Inception weights
    kid         kid, kid_std            any       frames and inputs; Inception weights
    =========== ======================= ========= ==========================================

LPIPS and the path formulas are :mod:`impus_lite.perceptual`'s (AlexNet, inputs in [-1, 1]);
FID and KID are torchmetrics' (:mod:`impus_lite.metrics.fid`). Example::

    from impus_lite.metrics import compute
    compute("diffmorpher", result)                  # 17 frames, or render=...
    compute("impus", render=path)                  # path(alphas) -> frames
    compute("fid", result, inputs=inputs)           # needs the Inception weights
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional, Sequence

from ..errors import InputError
from . import aid, diffmorpher, freemorph, impus
from .base import Convention, Render, uniform_alphas
from .fid import FID_CONVENTION, KID_CONVENTION, fid, inception, kid

#: name -> :class:`Convention` (its ``measure`` computes it).
METRICS: dict[str, Convention] = {c.name: c for c in (
    diffmorpher.CONVENTION, freemorph.CONVENTION, impus.CONVENTION, aid.CONVENTION,
    FID_CONVENTION, KID_CONVENTION)}

_SHARED = ("frames", "render", "distance", "inputs", "network", "strict")


def compute(name: str, frames=None, *, render: Optional[Render] = None,
            distance: Optional[Callable] = None, inputs=None, network=None, strict: bool = True,
            **options) -> dict:
    """The numbers of convention ``name`` on one morph.

    Args:
        name: a key of :data:`METRICS`.
        frames: a MorphResult or (K, 3, H, W) in [-1, 1], the frames as the method made them.
        render: alphas (list of floats) -> frames (len(alphas), 3, H, W) in [-1, 1]; needed by
            "impus", and by "diffmorpher"/"freemorph" when the frames are not 17/7.
        distance: batched image distance ``(B,3,H,W), (B,3,H,W) -> (B,)``; None = LPIPS.
        inputs: (2, 3, H, W) in [-1, 1], the two input images (FID, KID, FreeMorph's ends).
        network: Inception from :func:`inception` ("random" for tests); None = real weights.
        strict: False lets a fixed-frame convention measure frames of another count.
        options: the convention's own settings (e.g. ``samples``, ``eps`` for "impus").
    Returns:
        ``{key: float}`` as listed in ``METRICS[name].keys``, plus the frame or sample count.
    """
    if name not in METRICS:
        raise InputError(f"Unknown metric '{name}': use one of {', '.join(METRICS)}.")
    measure = METRICS[name].measure
    known = set(inspect.signature(measure).parameters) - set(_SHARED)
    unknown = sorted(set(options) - known)
    if unknown:
        raise InputError(f"Metric '{name}' has no option {', '.join(unknown)}"
                         + (f": its options are {', '.join(sorted(known))}." if known else "."))
    return measure(frames=frames, render=render, distance=distance, inputs=inputs,
                   network=network, strict=strict, **options)


def compute_many(names: Sequence[str], frames=None, **kwargs) -> dict:
    """Several conventions on one morph as one flat row, e.g. ``{"diffmorpher_ppl": ...,
    "aid_smoothness": ..., "fid": ..., "kid_std": ...}``: each key prefixed with its convention's
    name unless it already starts with it; frame and sample counts are left out. ``kwargs`` are
    :func:`compute`'s shared arguments (render, distance, inputs, network, strict)."""
    row = {}
    for name in names:
        for key, value in compute(name, frames, **kwargs).items():
            if key in METRICS[name].keys:
                row[key if key == name or key.startswith(f"{name}_") else f"{name}_{key}"] = value
    return row


__all__ = ["METRICS", "Convention", "Render", "compute", "compute_many", "fid", "kid", "inception",
           "uniform_alphas"]
