"""What every published metric convention shares: its description, the frames it is measured
on, and the distance it uses.

A convention is measured on a morph given as

* ``frames``: a :class:`~impus_lite.result.MorphResult` (its ``images``) or a tensor
  (K, 3, H, W) in [-1, 1], the frames exactly as the method made them (its own alphas);
* ``render``: a path, ``render(alphas: list[float]) -> (len(alphas), 3, H, W)`` in [-1, 1],
  for conventions defined on a fixed number of frames (rendered at uniform alphas) or on
  frames at random alphas (IMPUS's PPL).

Distances are LPIPS by default (:func:`impus_lite.perceptual.load_lpips`: AlexNet, inputs in
[-1, 1], the range lpips expects), whatever range the original script fed; any callable
``distance(a, b) -> (B,)`` on batches of images can replace it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..errors import InputError

#: A path: alphas -> frames (len(alphas), 3, H, W) in [-1, 1].
Render = Callable[[Sequence[float]], torch.Tensor]


@dataclass(frozen=True)
class Convention:
    """One published way of scoring a morph.

    Attributes:
        name: the key in :data:`impus_lite.metrics.METRICS`.
        keys: the numbers :attr:`measure` returns, e.g. ("ppl", "pdv").
        frames: total frames (ends included) the convention is defined on; None = any number.
        needs: what :attr:`measure` reads: any of "frames", "render", "inputs", "distance",
            "network" ("frames or render": either one).
        better: per key, "lower" or "higher".
        source: where the convention comes from (paper, repository, thread).
        measure: ``measure(frames=None, render=None, distance=None, inputs=None, network=None,
            strict=True, **options) -> dict[str, float]``.
    """

    name: str
    keys: tuple[str, ...]
    frames: Optional[int]
    needs: tuple[str, ...]
    better: dict
    source: str
    measure: Callable[..., dict]


def as_images(frames) -> Optional[torch.Tensor]:
    """The (K, 3, H, W) tensor of a MorphResult (its ``images``) or of a tensor; None stays None."""
    if frames is None:
        return None
    images = getattr(frames, "images", frames)
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
        raise InputError("Frames must be a MorphResult or a tensor (K, 3, H, W) in [-1, 1].")
    return images


def uniform_alphas(count: int) -> list[float]:
    """``count`` evenly spaced alphas k / (count - 1) from 0 to 1 (both ends included)."""
    if count < 2:
        raise InputError(f"A path needs at least 2 frames, got {count}.")
    return [k / (count - 1) for k in range(count)]


def frames_at(count: int, label: str, frames=None, render: Optional[Render] = None,
              strict: bool = True) -> torch.Tensor:
    """The ``count`` frames a convention is defined on.

    Frames with exactly ``count`` images are used as given (the method's own alphas). Otherwise
    ``render`` is called once with ``count`` uniform alphas. With neither, ``strict=False``
    measures the frames given, whatever their number; ``strict=True`` raises one sentence.
    """
    images = as_images(frames)
    if images is not None and images.shape[0] == count:
        return images
    if render is not None:
        rendered = render(uniform_alphas(count))
        if rendered.shape[0] != count:
            raise InputError(f"render returned {rendered.shape[0]} frames for {count} alphas.")
        return rendered
    if images is None:
        raise InputError(f"{label} needs frames or render (alphas -> frames).")
    if strict:
        raise InputError(f"{label} is defined on {count} frames and this morph has "
                         f"{images.shape[0]}: morph with {count} frames, pass render "
                         f"(alphas -> frames) to render {count} uniform frames, or strict=False "
                         f"to measure the {images.shape[0]} frames given.")
    return images


def lpips_or(distance: Optional[Callable]) -> Callable:
    """``distance`` if given, else this package's LPIPS (AlexNet, [-1, 1], shared instance)."""
    if distance is not None:
        return distance
    from ..perceptual import load_lpips
    return load_lpips()
