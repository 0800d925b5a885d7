"""Checks for the barycenter exercises (notebooks 00 and 01).

    checks.check_dirac_barycenter_cost(fn)   # 00, Derivation 1: min of the objective for two Diracs
    checks.check_gaussian_barycenter(answer) # 01, Derivation 1: mean and std at alpha = 0.3
    checks.check_dirac_barycenter(fn)        # 01: the barycenter of two images read as points
    checks.check_quantile_barycenter(fn)     # 01: the 1D W2 barycenter by averaging quantiles

Conventions are :mod:`impus_lite.ot`'s: ``alpha`` is the weight of the *second* end (alpha = 0
gives the first), the objective is ``(1 - alpha) W2^2(mu0, nu) + alpha W2^2(mu1, nu)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import ot as iot
from ..interp import lerp
from .base import CheckResult, as_array, check_value, compare, largest_difference, report

__all__ = ["check_dirac_barycenter_cost", "check_gaussian_barycenter", "check_dirac_barycenter",
           "check_quantile_barycenter"]


def _objective(x0: np.ndarray, x1: np.ndarray, alpha: float, y: np.ndarray) -> float:
    """(1 - alpha) |y - x0|^2 + alpha |y - x1|^2: the barycenter objective at nu = delta_y."""
    return float((1 - alpha) * np.sum((y - x0) ** 2) + alpha * np.sum((y - x1) ** 2))


def check_dirac_barycenter_cost(fn) -> CheckResult:
    """``fn(x0, x1, alpha)``: the least value of the barycenter objective for two Diracs.

    For the point masses delta_x0, delta_x1 (x0, x1 in R^d: two images read as points),
    ``min_nu (1 - alpha) W2^2(delta_x0, nu) + alpha W2^2(delta_x1, nu)``, a number. The expected
    value is the objective at the package's minimiser, nu = delta_y with
    ``y = impus_lite.interp.lerp(x0, x1, alpha)``; it equals ``alpha (1 - alpha) |x0 - x1|^2``.
    Inputs: numpy float64 vectors of 2, 3 and 48 entries (seeded), alpha in {0, 0.3, 0.5, 0.85}.
    Error: the largest difference relative to the largest expected value; tolerance 1e-6.
    """
    rng = np.random.default_rng(0)
    cases = [(np.array([0.0, 0.0]), np.array([3.0, 4.0]), 0.3)]
    cases += [(rng.standard_normal(d), rng.standard_normal(d), a) for d, a in ((3, 0.5), (48, 0.85), (48, 0.0))]
    expected = []
    for x0, x1, a in cases:
        y = lerp(torch.as_tensor(x0), torch.as_tensor(x1), a).numpy()
        expected.append(_objective(x0, x1, a, y))
    expected = np.array(expected)

    def compute():
        return np.array([float(fn(x0.copy(), x1.copy(), a)) for x0, x1, a in cases])

    hint = ("put the minimiser y = (1 - alpha) x0 + alpha x1 back into the objective: "
            "W2^2 between two Diracs is the SQUARED distance of their points")
    try:  # name the likeliest slip: the unsquared distance
        got = compute()
        unsquared = np.array([a * (1 - a) * np.linalg.norm(x0 - x1) for x0, x1, a in cases])
        if largest_difference(got, unsquared) < 1e-6 * np.abs(unsquared).max():
            hint = "you used |x0 - x1|; W2^2(delta_x, delta_y) = |x - y|^2, squared"
    except Exception:  # compare() below reports it
        pass
    return compare("the least barycenter cost of two Diracs, 4 cases", compute, expected, 1e-6,
                   hint, relative_to=float(np.abs(expected).max()))


def check_gaussian_barycenter(answer) -> CheckResult:
    """``answer = (mean, std)``: the W2 barycenter of N(0, 1) and N(4, 0.25^2) at alpha = 0.3.

    Closed form (1D Gaussians; the quantile functions are m + s Phi^{-1}(u) and average):
    mean ``0.7 * 0 + 0.3 * 4 = 1.2``, std ``0.7 * 1 + 0.3 * 0.25 = 0.775``.
    (``impus_lite.ot.displacement_interpolation_1d`` on 400 bins of [-6, 8] measures the same
    to within 1e-3.) Tolerance 1e-3 on both numbers.
    """
    expected = np.array([1.2, 0.775])
    if answer is Ellipsis or answer is None:
        return check_value("barycenter of N(0, 1) and N(4, 0.25^2) at alpha = 0.3", answer, expected, 1e-3)
    got = as_array(answer).reshape(-1)
    hint = "the mean and the standard deviation both interpolate linearly in alpha"
    if got.shape == (2,):
        if abs(got[0] - 2.8) < 1e-3:
            hint = "alpha = 0.3 is the weight of the SECOND Gaussian, N(4, 0.25^2)"
        elif abs(got[1] - math.sqrt(0.7 * 1.0 + 0.3 * 0.0625)) < 1e-3:
            hint = ("you interpolated the variances (that is the mixture's rule, with its means "
                    "added); the barycenter interpolates the standard deviations")
    return check_value("barycenter of N(0, 1) and N(4, 0.25^2) at alpha = 0.3, (mean, std)", got,
                       expected, 1e-3, hint)


def check_dirac_barycenter(fn) -> CheckResult:
    """``fn(x0, x1, alpha)``: argmin_y (1 - alpha) |y - x0|^2 + alpha |y - x1|^2 for two images.

    Two images read as points of image space: the W2 barycenter of delta_x0 and delta_x1 is
    delta_y with y the pixel mixture ``(1 - alpha) x0 + alpha x1``, the package's
    ``impus_lite.interp.lerp(x0, x1, alpha)``. Inputs: float32 tensors (3, 8, 8) in [-1, 1]
    (seeded), alpha in {0, 0.3, 0.75, 1}; the answer must keep the shape (3, 8, 8).
    Tolerance 1e-5 (largest pixel difference).
    """
    generator = torch.Generator().manual_seed(0)
    x0, x1 = torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1
    alphas = (0.0, 0.3, 0.75, 1.0)
    expected = torch.stack([lerp(x0, x1, a) for a in alphas])

    def compute():
        return torch.stack([torch.as_tensor(fn(x0.clone(), x1.clone(), a)) for a in alphas])

    hint = "set the gradient in y to zero: (1 - alpha)(y - x0) + alpha (y - x1) = 0"
    try:
        swapped = torch.stack([lerp(x0, x1, 1 - a) for a in alphas])
        if largest_difference(compute(), swapped) < 1e-5:
            hint = "the weights are swapped: alpha is the weight of x1 (alpha = 0 gives x0)"
    except Exception:
        pass
    return compare("barycenter of two images read as points, 4 alphas", compute, expected, 1e-5, hint)


def _quantile_cases():
    """The histograms of the quantile-barycenter check: (h0, h1, bin positions) pairs."""
    x = np.linspace(-6, 6, 80)
    h0 = iot.gaussian_histogram(x, -3.0, 0.6)
    h1 = 0.5 * iot.gaussian_histogram(x, 1.5, 0.5) + 0.5 * iot.gaussian_histogram(x, 3.5, 0.7)
    x2 = np.linspace(0.0, 10.0, 50)
    g0 = iot.gaussian_histogram(x2, 2.0, 0.8)
    g1 = iot.normalize_histogram(np.where((x2 > 6) & (x2 < 9), 1.0, 0.0))
    return [(h0, h1, x), (g0, g1, x2)]


def check_quantile_barycenter(fn) -> CheckResult:
    """``fn(h0, h1, alpha, x)``: the W2 barycenter of two 1D histograms by averaging quantiles.

    In 1D the optimal plan matches quantiles, so the barycenter has the quantile function
    ``Q_alpha(u) = (1 - alpha) Q_0(u) + alpha Q_1(u)``; the answer is that distribution as a
    histogram (n,) on the bins ``x`` (n,), summing to 1. Expected: the package's exact
    ``impus_lite.ot.displacement_interpolation_1d``. Inputs: two pairs (a bump and two bumps on
    80 bins of [-6, 6]; a bump and a box on 50 bins of [0, 10]), alpha in {0.25, 0.5, 0.8}.
    Error: the largest W2 distance (``impus_lite.ot.w2_distance_1d``) to the expected histogram,
    in bin widths. Tolerance 1: rounding the barycenter onto the grid costs up to about half a
    bin (the package's linear program, ``lp_barycenter_1d``, lies 0.4-0.5 bins away; a quantile
    function interpolated between bin centres instead of cell edges 0.7), while the mixture is
    8-14 bins away and swapped weights 13-22 bins.
    """
    cases = [(h0, h1, x, a) for h0, h1, x in _quantile_cases() for a in (0.25, 0.5, 0.8)]
    name = "1D barycenter by quantiles, 2 pairs x 3 alphas, W2 to the exact one in bins"

    def compute():
        return [as_array(fn(h0.copy(), h1.copy(), a, x.copy())) for h0, h1, x, a in cases]

    try:
        got = compute()
    except Exception:  # compare() runs it again and says "not written yet" or names the error
        return compare(name, compute, 0.0, 1.0)
    for h, (h0, _, _, _) in zip(got, cases):
        if h.shape != h0.shape:
            return report(CheckResult(name, "wrong", math.inf, 1.0,
                                      f"shape {h.shape}, expected {h0.shape}: one weight per bin of x"))
        if not np.all(np.isfinite(h)) or np.any(h < -1e-9) or abs(h.sum() - 1) > 1e-6:
            return report(CheckResult(name, "wrong", math.inf, 1.0, "a histogram has non-negative "
                                      f"weights summing to 1 (got sum {h.sum():.4g})"))
    got = [np.clip(h, 0.0, None) for h in got]

    def distances(reference):
        return np.array([iot.w2_distance_1d(h, reference(h0, h1, a, x), x) / (x[1] - x[0])
                         for h, (h0, h1, x, a) in zip(got, cases)])

    error = distances(iot.displacement_interpolation_1d)
    hint = "compute Q_0 and Q_1 at the same levels u, average them with weights (1 - alpha, alpha), re-bin"
    if error.max() <= 1.0:
        pass
    elif np.max(distances(lambda h0, h1, a, x: iot.linear_mixture(h0, h1, a))) < 1.0:
        hint = "that is the linear mixture (averaged histograms): average the quantile functions instead"
    elif np.max(distances(lambda h0, h1, a, x: iot.displacement_interpolation_1d(h0, h1, 1 - a, x))) < 1.0:
        hint = "the weights are swapped: alpha is the weight of h1 (alpha = 0 gives h0)"
    return compare(name, lambda: float(error.max()), 0.0, 1.0, hint)
