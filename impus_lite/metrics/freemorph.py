"""FreeMorph's LPIPS_sum, PPL_sum and FID (Cao et al., ICCV 2025, arXiv 2507.01953, Table 1).

What is public, and followed here:

* **frames**: 5 in-between frames and the two inputs, 7 in all. FreeMorph's code
  (github.com/yukangcao/FreeMorph, freemorph.py) interpolates 7 latents at uniform alphas k/6
  (its attention weights follow Beta(20, 20) quantiles) and, when it saves a morph, puts the
  two input images in place of the first and last generated frames. :func:`measure` does the
  same when ``inputs`` are given; it uses 7 frames as they are, or renders the 7 uniform alphas
  through ``render``.
* **LPIPS_sum**: a sum of LPIPS distances between consecutive frames.
* **PPL_sum** = ``LPIPS_sum / eps^2`` with ``eps = 1/5``, i.e. 25 LPIPS_sum: in Table 1 on
  MorphBench, PPL_sum / LPIPS_sum = 25.0 for all three methods (3263.03 / 130.52,
  2264.20 / 90.57, 2122.80 / 84.91), StyleGAN's ``d / eps^2`` applied to the same distances.

What is not public (FreeMorph issue 7, https://github.com/yukangcao/FreeMorph/issues/7, asks
for the metrics script and has no answer; the repository has no evaluation code), and what is
chosen here instead:

* the LPIPS network and input range: this package's LPIPS (AlexNet, inputs in [-1, 1]);
* which gaps are summed: all 6 of the 7 frames, ``sum_{k=0}^{5} d_k``, the two gaps to the
  inputs included;
* why eps is 1/5 for 6 gaps;
* how the table aggregates pairs: its LPIPS_sum of 85-131 is far above what the 6 distances of
  one pair sum to, so it is a sum over pairs or a scaled mean (here: one pair, no scale);
* what "FID_mean" averages: here one FID of the 5 in-between frames (fake) against the two
  inputs (real), through :mod:`impus_lite.metrics.fid`, when ``inputs`` are given.

Treat the numbers as comparable with each other, not with Table 1.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..perceptual import consecutive_distances, ppl_path_sum
from .base import Convention, Render, as_images, frames_at, lpips_or

IN_BETWEEN = 5
FRAMES = IN_BETWEEN + 2
EPS = 1.0 / IN_BETWEEN
SOURCE = ("arXiv 2507.01953 Table 1; github.com/yukangcao/FreeMorph freemorph.py (7 frames); "
          "https://github.com/yukangcao/FreeMorph/issues/7 (no metrics script)")


def from_distances(distances) -> dict[str, float]:
    """``{"lpips_sum": sum_k d_k, "ppl_sum": sum_k d_k / eps^2}`` with eps = 1/5."""
    total = ppl_path_sum(distances)
    return {"lpips_sum": total, "ppl_sum": total / EPS ** 2}


def measure(frames=None, render: Optional[Render] = None, distance: Optional[Callable] = None,
            inputs=None, network=None, strict: bool = True) -> dict[str, float]:
    """FreeMorph's LPIPS_sum and PPL_sum on 7 frames, and FID when ``inputs`` are given.

    Args:
        frames: a MorphResult or (K, 3, H, W) in [-1, 1]; used as given when K = 7.
        render: alphas -> frames; called with the 7 uniform alphas k/6 otherwise.
        distance: batched image distance; None = LPIPS (AlexNet, [-1, 1]).
        inputs: (2, 3, H, W) in [-1, 1], the two input images: they replace the end frames (as
            FreeMorph saves a morph) and are the real set of the FID.
        network: Inception from :func:`impus_lite.metrics.fid.inception` for the FID; None
            loads the real weights (one clear error offline).
        strict: False measures frames of any count when there is no render.
    Returns:
        ``lpips_sum``, ``ppl_sum``, ``frames`` and, with ``inputs``, ``fid``.
    """
    images = frames_at(FRAMES, "FreeMorph's LPIPS_sum/PPL_sum", frames, render, strict)
    inputs = as_images(inputs)
    if inputs is not None:
        images = torch.cat([inputs[:1].to(images), images[1:-1], inputs[-1:].to(images)])
    out = from_distances(consecutive_distances(images, lpips_or(distance)))
    out["frames"] = int(images.shape[0])
    if inputs is not None:
        from .fid import fid
        out["fid"] = fid(inputs, images[1:-1], network)
    return out


CONVENTION = Convention(
    name="freemorph", keys=("lpips_sum", "ppl_sum", "fid"), frames=FRAMES,
    needs=("frames or render", "distance", "inputs (FID, end frames)", "network"),
    better={"lpips_sum": "lower", "ppl_sum": "lower", "fid": "lower"}, source=SOURCE,
    measure=measure)
