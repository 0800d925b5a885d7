"""Interpolating tensors: linear (lerp) and spherical (slerp), batched and numerically safe.

IMPUS interpolates text embeddings linearly, ``e(alpha) = (1 - alpha) e0 + alpha e1``, and the
inverted DDIM codes spherically, because the norm of a d-dimensional standard Gaussian vector
concentrates at sqrt(d): a straight line between two such codes passes through vectors of
smaller norm, which the diffusion model has never seen as noise.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

Alphas = Union[float, Sequence[float], torch.Tensor]


def _float64_device(like: torch.Tensor) -> torch.device:
    """Where to compute in float64: ``like``'s device, or the CPU for Apple's MPS (no float64)."""
    return torch.device("cpu") if like.device.type == "mps" else like.device


def _alpha_column(alpha: Alphas, like: torch.Tensor) -> torch.Tensor:
    """Alphas as a (K, 1, ..., 1) float64 tensor broadcastable against a batch of ``like``'s shape."""
    a = torch.as_tensor(alpha, dtype=torch.float64, device=_float64_device(like)).reshape(-1)
    return a.reshape(-1, *([1] * like.dim()))


def _is_scalar(alpha: Alphas) -> bool:
    """A single alpha (a Python, numpy or 0-d torch number): the result drops the K axis."""
    return torch.as_tensor(alpha).dim() == 0


def lerp(x0: torch.Tensor, x1: torch.Tensor, alpha: Alphas) -> torch.Tensor:
    """Linear interpolation ``(1 - alpha) x0 + alpha x1`` for each alpha.

    Args:
        x0, x1: tensors of the same shape S (a leading batch dimension of 1 is kept).
        alpha: a float or K floats; values outside [0, 1] extrapolate.

    Returns:
        (K, *S) in x0's dtype, or S when ``alpha`` is a plain float.
    """
    if x0.shape != x1.shape:
        raise ValueError(f"lerp needs tensors of one shape, got {tuple(x0.shape)} and {tuple(x1.shape)}.")
    a = _alpha_column(alpha, x0)
    out = ((1 - a) * _float64(x0) + a * _float64(x1)).to(x0.device, x0.dtype)
    return out[0] if _is_scalar(alpha) else out


def _float64(x: torch.Tensor) -> torch.Tensor:
    return x.to(_float64_device(x), torch.float64)


def slerp(x0: torch.Tensor, x1: torch.Tensor, alpha: Alphas, dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical linear interpolation of two tensors, treated as flat vectors.

    ``slerp(x0, x1, a) = sin((1 - a) theta) / sin(theta) x0 + sin(a theta) / sin(theta) x1`` with
    ``theta = arccos(<x0, x1> / (|x0| |x1|))``. When x0 and x1 are nearly parallel
    (``cos theta > dot_threshold``) this falls back to lerp, which is then equal to first order
    and free of the 0/0. When they are nearly opposite (``cos theta < -dot_threshold``), theta
    comes from ``2 atan2(|u0 - u1|, |u0 + u1|)`` (u: the unit vectors), which stays accurate where
    arccos rounds to pi; exactly opposite vectors have no shortest arc and raise ValueError. For
    unit vectors the result has unit norm; for vectors of equal norm r it keeps norm r. Computed
    in float64 (on the CPU for an MPS tensor).

    Args:
        x0, x1: tensors of the same shape S (e.g. (1, 4, 64, 64) DDIM codes).
        alpha: a float or K floats in [0, 1]; alpha = 0 returns x0, alpha = 1 returns x1.

    Returns:
        (K, *S) in x0's dtype, or S when ``alpha`` is a plain float.
    """
    if x0.shape != x1.shape:
        raise ValueError(f"slerp needs tensors of one shape, got {tuple(x0.shape)} and {tuple(x1.shape)}.")
    a = _alpha_column(alpha, x0)
    v0, v1 = _float64(x0), _float64(x1)
    n0, n1 = v0.norm(), v1.norm()
    if n0 == 0 or n1 == 0:
        return lerp(x0, x1, alpha)
    cos = torch.clamp((v0 * v1).sum() / (n0 * n1), -1.0, 1.0)
    if cos > dot_threshold:
        return lerp(x0, x1, alpha)
    if cos < -dot_threshold:
        apart, together = (v0 / n0 - v1 / n1).norm(), (v0 / n0 + v1 / n1).norm()
        if together <= 1e-12 * apart:
            raise ValueError("slerp is undefined between opposite vectors (x1 = -c x0): every half "
                             "circle between them is as short; perturb one of them or use lerp.")
        theta = 2 * torch.atan2(apart, together)
    else:
        theta = torch.arccos(cos)
    sin = torch.sin(theta)
    out = (torch.sin((1 - a) * theta) / sin * v0 + torch.sin(a * theta) / sin * v1).to(x0.device, x0.dtype)
    return out[0] if _is_scalar(alpha) else out
