"""Checks for notebook 06 (choosing the alphas): the binary search, the reschedule, PDV, Gini.

Every check runs the student's function on fixed inputs and compares it with the package's own
implementation (:mod:`impus_lite.schedules`, :mod:`impus_lite.perceptual`) or a closed form.
The search and the reschedule run on the toy path of notebook 06, section 1: frame
``x(alpha)`` is a constant image whose every pixel is ``alpha**2``, and the distance is the
mean absolute pixel difference, so ``d(x(a), x(b)) = |a^2 - b^2|``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .. import perceptual, schedules
from .base import CheckResult, compare

__all__ = ["check_binary_search", "check_reschedule", "check_pdv",
           "check_gini", "check_toy_uniform_pdv"]


def toy_render(alphas) -> torch.Tensor:
    """Frames (K, 3, 8, 8) of the toy path: constant images whose every pixel is alpha squared."""
    return torch.stack([torch.full((3, 8, 8), float(a) ** 2) for a in alphas])


def toy_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean absolute pixel difference per frame, (K,): ``d(x(a), x(b)) = |a^2 - b^2|``."""
    return (x - y).abs().mean(dim=(1, 2, 3))


#: (step, tol) pairs the search is checked at (IMPUS: 0.2 and 0.01).
_SEARCHES = ((0.2, 0.01), (0.15, 0.005), (0.3, 0.02))


def check_binary_search(next_alpha: Callable) -> CheckResult:
    """IMPUS's binary search for the next frame, against :func:`impus_lite.schedules.perceptual_search`.

    ``next_alpha(render, distance, current, step, tol)`` returns the alpha of the next frame:
    with ``lo, hi = current, 1``, render the middle ``m = (lo + hi) / 2``, measure
    ``d = distance(x(current), x(m))``; accept ``m`` as soon as ``|d - step| <= tol``,
    otherwise keep ``(lo, m)`` when ``d > step`` and ``(m, hi)`` when not, and repeat (the
    package also stops once ``hi - lo < 1e-8``). ``render(alphas)`` gives frames (K, 3, H, W);
    ``distance(a, b)`` gives (K,) distances.

    Checked on the toy path for (step, tol) = (0.2, 0.01), (0.15, 0.005), (0.3, 0.02): from
    every frame the package's search keeps (but the end), the student's next alpha must be the
    package's next kept alpha (largest difference <= 1e-6).
    """
    expected, starts = [], []
    for step, tol in _SEARCHES:
        found = schedules.perceptual_search(schedules.FrameCache(toy_render), toy_distance, step, tol)
        starts += [(a, step, tol) for a in found.alphas[:-2]]
        expected += found.alphas[1:-1]

    def compute():
        return [float(next_alpha(toy_render, toy_distance, a, step, tol)) for a, step, tol in starts]

    return compare(f"the next alpha from {len(starts)} frames of the toy path", compute, expected, 1e-6,
                   "search in (current, 1], measure the distance from the CURRENT frame, and return the "
                   "first probe with |d - step| <= tol (not the exact crossing, not lo or hi)")


def _reschedule_cases():
    rng = np.random.default_rng(0)
    cases = [(schedules.uniform_alphas(5), [(2 * k + 1) / 16 for k in range(4)], 5)]   # the toy path
    for k, n in ((7, 9), (12, 6)):
        inner = np.sort(rng.uniform(0.02, 0.98, k - 2))
        cases.append(([0.0, *inner.tolist(), 1.0], rng.exponential(0.1, k - 1).tolist(), n))
    return cases


def check_reschedule(reschedule: Callable) -> CheckResult:
    """DiffMorpher's reschedule, against :func:`impus_lite.schedules.reschedule_alphas`.

    ``reschedule(alphas, distances, frames)``: ``alphas`` (K,) increasing from 0 to 1,
    ``distances`` (K-1,) positive, ``d_k = d(x(alpha_k), x(alpha_{k+1}))``. With the cumulative
    curve ``C(alpha_0) = 0``, ``C(alpha_k) = d_0 + ... + d_{k-1}``, linear between the
    ``alphas``, return the ``frames`` alphas ``C^{-1}(j C(1) / (frames - 1))``, j = 0..frames-1
    (so the first is 0 and the last is 1). Checked on the toy path's uniform alphas and two
    seeded random paths (7 alphas to 9 frames, 12 alphas to 6), tolerance 1e-9.
    """
    cases = _reschedule_cases()
    expected = np.concatenate([schedules.reschedule_alphas(a, d, n) for a, d, n in cases])

    def compute():
        return np.concatenate([np.asarray(reschedule(list(a), list(d), n), dtype=np.float64).reshape(-1)
                               for a, d, n in cases])

    return compare("rescheduled alphas of 3 paths", compute, expected, 1e-9,
                   "invert the curve: np.interp(targets, C, alphas) with targets from 0 to C[-1] "
                   "(C starts with a 0), not np.interp(targets, alphas, C)")


def _distance_sets():
    rng = np.random.default_rng(1)
    return [rng.uniform(0.05, 0.4, 8), rng.exponential(0.2, 16), np.array([0.2, 0.2, 0.2, 0.2]),
            np.array([0.0, 0.0, 0.9]), np.array([0.1, 0.3])]


def check_pdv(pdv: Callable) -> CheckResult:
    """PDV (DiffMorpher), against :func:`impus_lite.perceptual.pdv`.

    ``pdv(distances)`` with distances (K-1,) returns ``(1 / n) sum_k (d_k - mean(d))^2``: the
    population variance (``np.var``'s default), not the sample variance (1 / (n - 1)) nor the
    standard deviation. Checked on 5 fixed sets of 2 to 16 distances, relative tolerance 1e-9.
    """
    sets = _distance_sets()
    expected = [perceptual.pdv(d) for d in sets]
    return compare("PDV of 5 sets of distances", lambda: [float(pdv(d.copy())) for d in sets], expected, 1e-9,
                   "PDV is the population variance: divide by n (np.var(d)), not n - 1; and no square root",
                   relative_to=max(expected))


def check_gini(gini: Callable) -> CheckResult:
    """The Gini coefficient (AID's smoothness is ``1 - Gini``), against :func:`impus_lite.perceptual.gini`.

    ``gini(d)`` with d (n,) non-negative, not all zero, returns
    ``sum_i sum_j |d_i - d_j| / (2 n^2 mean(d))``: 0 for equal values, (n - 1) / n when one
    value holds everything. Checked on 5 fixed sets of 2 to 16 values, tolerance 1e-9.
    """
    sets = _distance_sets()
    expected = [perceptual.gini(d) for d in sets]
    return compare("Gini of 5 sets of distances", lambda: [float(gini(d.copy())) for d in sets], expected, 1e-9,
                   "the double sum runs over all ordered pairs (i, j), i = j included, and is divided "
                   "by 2 n^2 mean(d) (not n (n - 1) mean(d))")


def check_toy_uniform_pdv(pdv_uniform: Callable) -> CheckResult:
    """The PDV of K uniform frames on the toy path, a closed form in K.

    Uniform alphas ``k / (K-1)`` on ``x(alpha) = alpha^2`` give steps ``d_k = (2k+1) / (K-1)^2``,
    k = 0..K-2. ``pdv_uniform(K)`` must equal :func:`impus_lite.perceptual.pdv` of these steps as
    the package measures them (:func:`impus_lite.schedules.fixed_schedule` on the toy path) for
    K = 3, 5, 9, 17 (relative tolerance 1e-6).
    """
    ks = (3, 5, 9, 17)
    expected = [perceptual.pdv(schedules.fixed_schedule(schedules.uniform_alphas(k), schedules.FrameCache(toy_render),
                                                        toy_distance).distances) for k in ks]
    return compare("PDV of uniform alphas on the toy path, K = 3, 5, 9, 17",
                   lambda: [float(pdv_uniform(k)) for k in ks], expected, 1e-6,
                   "the steps are (2k+1)/n^2 with n = K - 1: mean 1/n, and Var(2k+1) = 4 Var(k) = (n^2 - 1)/3 "
                   "for k uniform on 0..n-1", relative_to=max(expected))
