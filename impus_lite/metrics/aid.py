"""AID's smoothness and consistency (He et al., NeurIPS 2024, arXiv 2403.17924).

Convention, as in AID's code (github.com/QY-H00/attention-interpolation-diffusion, utils.py,
``compute_smoothness_and_consistency``):

* **frames**: any number; the gaps of the whole sequence, ends included
  (AID's sequences are its own interpolations, their length set by the user).
* **smoothness** = ``1 - Gini(d)``, ``Gini(d) = sum_ij |d_i - d_j| / (2 n^2 mean(d))`` over the
  n = K-1 consecutive distances (:func:`impus_lite.perceptual.smoothness`): 1 for perfectly
  even steps, 1/n when one step holds the whole change. Higher is better.
* **consistency** = ``mean_k d_k``: a mean, not a sum. Lower is better.
* **max_distance** = ``max_k d_k``, the largest single jump (AID's code returns it as
  ``max_inception_distance`` although it is an LPIPS distance). Lower is better.
* **distance**: AID's code feeds ``lpips.LPIPS`` images in [0, 1] normalised with ImageNet's
  mean and standard deviation, a range lpips does not expect; here this package's LPIPS
  (AlexNet, inputs in [-1, 1]). With fewer than two distances AID's Gini is 0, as here.

AID also reports fidelity (FID of its generations against a data set such as CIFAR-10 or
LAION); for a morph the comparable number is FID against the inputs (``"fid"`` in
:data:`impus_lite.metrics.METRICS`).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from ..perceptual import consecutive_distances, smoothness
from .base import Convention, Render, as_images, frames_at, lpips_or

SOURCE = ("github.com/QY-H00/attention-interpolation-diffusion utils.py "
          "(compute_smoothness_and_consistency); arXiv 2403.17924")


def from_distances(distances) -> dict[str, float]:
    """``smoothness`` (1 - Gini), ``consistency`` (mean) and ``max_distance`` of the gaps."""
    d = np.asarray(distances, dtype=np.float64).reshape(-1)
    return {"smoothness": smoothness(d), "consistency": float(d.mean()),
            "max_distance": float(d.max())}


def measure(frames=None, render: Optional[Render] = None, distance: Optional[Callable] = None,
            inputs=None, network=None, strict: bool = True,
            count: Optional[int] = None) -> dict[str, float]:
    """AID's smoothness, consistency and largest jump of a morph.

    Args:
        frames: a MorphResult or (K, 3, H, W) in [-1, 1], measured as given.
        render: alphas -> frames, used when there are no frames (``count`` uniform alphas).
        distance: batched image distance; None = LPIPS (AlexNet, [-1, 1]).
        count: frames to render when only ``render`` is given (default 9).
        inputs, network, strict: not used (the shared interface).
    Returns:
        ``smoothness``, ``consistency``, ``max_distance`` and ``frames``.
    """
    images = as_images(frames)
    if images is None:
        images = frames_at(count or 9, "AID's smoothness", None, render)
    out = from_distances(consecutive_distances(images, lpips_or(distance)))
    out["frames"] = int(images.shape[0])
    return out


CONVENTION = Convention(
    name="aid", keys=("smoothness", "consistency", "max_distance"), frames=None,
    needs=("frames or render", "distance"),
    better={"smoothness": "higher", "consistency": "lower", "max_distance": "lower"},
    source=SOURCE, measure=measure)
