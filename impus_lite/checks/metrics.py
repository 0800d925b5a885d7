"""Checks for the evaluation lessons (notebooks 08, 09 and 11): path metrics, rPPD, realism and
DiffMorpher's AdaIN of the start codes.

Every check runs the student's function on fixed, seeded inputs (small tensors: no model, well
under a second on a CPU) and compares with :mod:`impus_lite.perceptual` or
:mod:`impus_lite.methods.diffmorpher`, or with a path whose answer is measured, not assumed.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .base import CheckResult, check_value, compare

__all__ = ["check_ppl", "check_rppd_straight", "check_knn_precision", "check_dissolve_distance",
           "check_adain"]


def _mean_abs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, ...) , (B, ...) -> (B,) mean absolute difference: a metric (lengths add up)."""
    return (a - b).abs().flatten(1).mean(dim=1)


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, ...) , (B, ...) -> (B,) mean squared difference: a squared distance, like LPIPS for
    small steps."""
    return (a - b).pow(2).flatten(1).mean(dim=1)


def _scalar(value) -> float:
    """The number a student's function returned (the first item of a tuple, as
    :func:`impus_lite.perceptual.knn_precision` returns one)."""
    if isinstance(value, tuple):
        value = value[0]
    return float(value)


def check_ppl(ppl: Callable) -> CheckResult:
    """``ppl(frames, distance) -> float``: the path-sum perceptual path length (DiffMorpher).

        PPL = sum_{k=0}^{K-2} d(x_k, x_{k+1})

    ``frames`` is a (K, 3, H, W) tensor; ``distance(a, b)`` takes two batches (B, 3, H, W) and
    returns (B,) distances (as :class:`impus_lite.perceptual.Lpips` does). Checked on two seeded
    random walks of K = 6 and K = 9 frames of 3x8x8 images, with the mean absolute difference as
    the distance, against :func:`impus_lite.perceptual.ppl_path_sum` of
    :func:`impus_lite.perceptual.consecutive_distances`.
    """
    from ..perceptual import consecutive_distances, ppl_path_sum

    g = torch.Generator().manual_seed(8)
    walks = [torch.randn(k, 3, 8, 8, generator=g, dtype=torch.float64).cumsum(0) * 0.1 for k in (6, 9)]
    expected = [ppl_path_sum(consecutive_distances(w, _mean_abs)) for w in walks]
    return compare("path-sum PPL of two random walks (K = 6, 9)",
                   lambda: [_scalar(ppl(w, _mean_abs)) for w in walks], expected, 1e-9,
                   hint="PPL is the SUM over the K-1 consecutive pairs d(x_k, x_{k+1}): not their "
                        "mean, and not the distances of every frame to the first")


def check_rppd_straight(rppd_straight) -> CheckResult:
    """``rppd_straight(K) -> float``: rPPD of a straight path of K uniform frames measured with a
    squared distance (close to LPIPS for small steps), from the IMPUS paper's equation

        rPPD = sum_{k=0}^{K-2} d(x_k, x_{k+1}) / ((K-1) d(x_0, x_{K-1})) = 1 / (K-1)^2.

    A function is checked for K = 3, 5, 10, 17 against :func:`impus_lite.perceptual.rppd`
    measured on the cross-dissolve of two seeded 3x8x8 images with the mean squared difference as
    d. A number is checked as the value at K = 10 (1/81 = 0.0123, absolute tolerance 1e-4).
    """
    hint = ("under a squared distance each of the K-1 steps is d/(K-1)^2, so the sum is d/(K-1) and "
            "rPPD divides by (K-1) d once more; 1/(K-1) is the answer for a distance whose steps add up")
    if not callable(rppd_straight):
        return check_value("rPPD of a straight path of 10 frames, squared distance", rppd_straight,
                           1 / 81, 1e-4, hint)
    from ..interp import lerp
    from ..perceptual import consecutive_distances, rppd

    g = torch.Generator().manual_seed(9)
    x0, x1 = (torch.randn(1, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    counts = (3, 5, 10, 17)
    expected = []
    for k in counts:
        path = lerp(x0, x1, np.linspace(0, 1, k))[:, 0]
        expected.append(rppd(consecutive_distances(path, _mse), float(_mse(x0, x1)[0])))
    return compare("rPPD of a straight path, squared distance, K = 3, 5, 10, 17",
                   lambda: [_scalar(rppd_straight(k)) for k in counts], expected, 1e-9, hint=hint)


def check_knn_precision(knn_precision: Callable) -> CheckResult:
    """``knn_precision(real, fake, k) -> float``: improved precision (Kynkaanniemi et al. 2019).

    Each real feature r (rows of ``real``, (N, D)) gets a ball of radius NN_k(r), its distance to
    its k-th nearest *other* real feature; the precision is the share of rows of ``fake``
    ((M, D)) inside at least one ball:

        precision = (1/M) sum_g 1[ exists r: |phi_g - phi_r| <= NN_k(r) ]   (Euclidean).

    Checked with k = 3 and k = 1 on seeded features (40 real, 30 generated, D = 5; some
    generated near the real ones, some far) against :func:`impus_lite.perceptual.knn_precision`.
    A returned tuple (precision, inside) counts by its first item.
    """
    from ..perceptual import knn_precision as reference

    g = torch.Generator().manual_seed(10)
    real = torch.randn(40, 5, generator=g, dtype=torch.float64)
    near = real[:18] + 0.35 * torch.randn(18, 5, generator=g, dtype=torch.float64)
    far = 1.6 * torch.randn(12, 5, generator=g, dtype=torch.float64) + 1.0
    fake = torch.cat([near, far])
    expected = [reference(real, fake, k)[0] for k in (3, 1)]
    return compare("k-NN precision of 30 samples against 40 real ones, k = 3 and k = 1",
                   lambda: [_scalar(knn_precision(real.clone(), fake.clone(), k)) for k in (3, 1)],
                   expected, 1e-9,
                   hint="the ball of r reaches its k-th nearest OTHER real sample: r's distance to "
                        "itself (0) is not a neighbour, so take the (k+1)-th smallest of its row")


def check_dissolve_distance(dissolve_distance: Callable) -> CheckResult:
    """``dissolve_distance(alpha, rms) -> float``: how far the cross-dissolve frame
    ``(1 - alpha) x_0 + alpha x_1`` is from the nearer of its two inputs, in RMS pixel distance,
    given ``rms = RMS(x_0 - x_1)`` (a closed form: no images needed).

    Checked at 7 alphas in [0, 1] on two seeded 3x16x16 images, against the distances measured on
    the frames themselves.
    """
    g = torch.Generator().manual_seed(11)
    x0, x1 = (torch.rand(3, 16, 16, generator=g, dtype=torch.float64) * 2 - 1 for _ in range(2))
    rms = float((x0 - x1).pow(2).mean().sqrt())
    alphas = [0.0, 0.1, 0.25, 0.5, 0.6, 0.9, 1.0]
    expected = []
    for a in alphas:
        frame = (1 - a) * x0 + a * x1
        expected.append(min(float((frame - x).pow(2).mean().sqrt()) for x in (x0, x1)))
    return compare("distance of the cross-dissolve to its nearer input at 7 alphas",
                   lambda: [_scalar(dissolve_distance(a, rms)) for a in alphas], expected, 1e-9,
                   hint="(1 - a) x_0 + a x_1 - x_0 = a (x_1 - x_0): the frame is a RMS(x_0 - x_1) "
                        "from x_0 and (1 - a) RMS(x_0 - x_1) from x_1; the nearer is the smaller")


def check_adain(adain: Callable) -> CheckResult:
    """``adain(s, z0, z1, alpha) -> (1, C, h, w)``: DiffMorpher's AdaIN of a slerped start code.

        z(a) = (s - mean(s)) / std(s) * ((1 - a) sd_0 + a sd_1) + (1 - a) mu_0 + a mu_1

    per channel, over the spatial positions: mean and std of ``s``, mu_k and sd_k of ``z_k``, with
    std = sqrt(population variance + 1e-5) (``torch.nn.functional.instance_norm``'s). ``s`` is
    ``slerp(z0, z1, alpha)`` (1, C, h, w). Checked at alpha = 0, 0.3, 0.5, 1 on two seeded
    (1, 4, 8, 8) codes whose channels have different means and spreads, against
    :func:`impus_lite.methods.diffmorpher.interpolate_codes`.
    """
    from ..methods.diffmorpher import interpolate_codes

    g = torch.Generator().manual_seed(12)
    scale0, scale1 = torch.tensor([0.6, 1.0, 1.4, 0.9]), torch.tensor([1.2, 0.7, 1.0, 1.5])
    shift0, shift1 = torch.tensor([0.2, -0.1, 0.0, 0.3]), torch.tensor([-0.3, 0.1, 0.4, 0.0])
    z0 = torch.randn(1, 4, 8, 8, generator=g) * scale0.view(1, 4, 1, 1) + shift0.view(1, 4, 1, 1)
    z1 = torch.randn(1, 4, 8, 8, generator=g) * scale1.view(1, 4, 1, 1) + shift1.view(1, 4, 1, 1)
    alphas = [0.0, 0.3, 0.5, 1.0]
    slerped = interpolate_codes(z0, z1, alphas, adain=False)
    expected = interpolate_codes(z0, z1, alphas, adain=True)

    def compute():
        return torch.cat([torch.as_tensor(adain(slerped[i:i + 1].clone(), z0.clone(), z1.clone(), a)).reshape(1, 4, 8, 8)
                          for i, a in enumerate(alphas)])

    return compare("AdaIN of the slerped code at alpha = 0, 0.3, 0.5, 1", compute, expected, 1e-4,
                   hint="statistics per channel, over the positions only (dim=(2, 3)), not over the "
                        "whole code; interpolate the standard deviations, not the variances")
