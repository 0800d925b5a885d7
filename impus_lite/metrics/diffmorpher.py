"""DiffMorpher's PPL and PDV (Zhang et al., CVPR 2024, arXiv 2312.07409, Table 1 on MorphBench).

Convention: what the evaluation script the authors posted in
https://github.com/Kevin-thu/DiffMorpher/issues/33 shows, and what is assumed where it could not
be read (see the end; the metrics are introduced in section 4.4 of the paper):

* **frames**: 17 (both ends included, so 16 consecutive gaps), the method's own output frames
  (DiffMorpher's reschedule chooses their alphas). :func:`measure` uses 17 frames given as they
  are, or renders 17 uniform alphas k/16 through ``render``.
* **distance**: ``lpips.LPIPS()`` with its defaults (AlexNet, v0.1 linear heads) on frames
  resized to 512x512 (torchvision ``Resize((512, 512))``), **inputs in [-1, 1]**: the script
  maps ``ToTensor`` output with ``Normalize(mean=0.5, std=0.5)``. (DiffMorpher's *method code*,
  its reschedule in utils/alpha_scheduler.py, feeds ``ToTensor`` output in [0, 1] instead; the
  metric script does not.) Here the distance is this package's LPIPS on the frames at their own
  size, the same range.
* **"ppl" is the sum of LPIPS steps**, ``sum_{k=0}^{15} d_k``, ``d_k = LPIPS(x_k, x_{k+1})``
  (:func:`impus_lite.perceptual.ppl_path_sum`), **not Table 1's PPL**: Table 1's scale is not
  reproduced until the reduction in issue 33 can be read (see the end). The key stays "ppl"
  (the metrics registry and its rows name it so); :data:`LABELS` gives the column's name.
* **PDV** = ``(1/16) sum_k (d_k - mean d)^2``: pinned as the *variance* of the 16 gaps, not
  their standard deviation (:func:`impus_lite.perceptual.pdv`), following the paper's name
  (perceptual distance *variance*, sec. 4.4, and Table 1's magnitudes: DDIM's 288.51 against
  a PPL of 25.38 is no standard deviation of steps that sum to the PPL) and the issue-33
  script, whose per-method accumulator is ``vars``; population variance (numpy's ``np.var``
  default, ``ddof=0``) is assumed. Some other scripts report the standard deviation (SPEC).
* FID: the thread names ``pytorch-fid``, without saying which sets it compares; here the frames
  against the inputs (:mod:`impus_lite.metrics.fid`, key "fid").

What could not be confirmed: the copy of the thread available when this was written shows the
script only up to the loading of the frames (the LPIPS model, the transform above, every PNG of
a pair's folder sorted by name, pairs with at most two frames skipped); the lines that reduce
the distances (sum or mean, ``np.var`` or ``np.std``, ``ddof``, any scale factor, the average
over pairs) could not be read. The plain sum and the population variance are used. Table 1's
magnitudes (overall PPL 21.10, above the largest plausible plain sum of 16 LPIPS distances)
imply a scale factor that neither the table nor the readable part of the script states; one
reading that gives numbers of this size is StyleGAN's ``d_k / eps^2`` with ``eps = 1/16``
(mean over gaps: ``16 sum_k d_k``, about 21 for a path of LPIPS length 1.3), but that is an
inference, not a documented fact, so it is not applied.
"""

from __future__ import annotations

from typing import Callable, Optional

from ..perceptual import consecutive_distances, pdv, ppl_path_sum
from .base import Convention, Render, frames_at, lpips_or

FRAMES = 17
SOURCE = "https://github.com/Kevin-thu/DiffMorpher/issues/33 (arXiv 2312.07409, sec. 4.4)"
#: What each key measures, for tables: "ppl" is not on Table 1's scale (see the module docstring).
LABELS = {"ppl": "sum of LPIPS steps", "pdv": "variance of LPIPS steps"}


def from_distances(distances) -> dict[str, float]:
    """``{"ppl": sum_k d_k, "pdv": Var_k d_k}``: the sum of the consecutive distances (the "sum
    of LPIPS steps", not Table 1's PPL scale) and their population variance."""
    return {"ppl": ppl_path_sum(distances), "pdv": pdv(distances)}


def measure(frames=None, render: Optional[Render] = None, distance: Optional[Callable] = None,
            inputs=None, network=None, strict: bool = True) -> dict[str, float]:
    """DiffMorpher's PPL and PDV on 17 frames (see the module docstring).

    Args:
        frames: a MorphResult or (K, 3, H, W) in [-1, 1]; used as given when K = 17.
        render: alphas -> frames; called with 17 uniform alphas when the frames are not 17.
        distance: batched image distance; None = LPIPS (AlexNet, [-1, 1]).
        strict: False measures frames of any count when there is no render.
        inputs, network: not used (the shared interface of :mod:`impus_lite.metrics`).
    Returns:
        ``ppl``, ``pdv`` and ``frames`` (the number of frames measured).
    """
    images = frames_at(FRAMES, "DiffMorpher's PPL/PDV", frames, render, strict)
    out = from_distances(consecutive_distances(images, lpips_or(distance)))
    out["frames"] = int(images.shape[0])
    return out


CONVENTION = Convention(
    name="diffmorpher", keys=("ppl", "pdv"), frames=FRAMES, needs=("frames or render", "distance"),
    better={"ppl": "lower", "pdv": "lower"}, source=SOURCE, measure=measure)
