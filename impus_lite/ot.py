"""Wasserstein barycenters and displacement interpolation, on POT (Python Optimal Transport).

IMPUS frames a morph as a barycenter problem between the two input distributions::

    xi_alpha = argmin_xi  (1 - alpha) W(xi_0, xi) + alpha W(xi_1, xi),     alpha in [0, 1],

with W the squared 2-Wasserstein distance (quadratic ground cost). For two measures its solution
is McCann's *displacement interpolation*: take the optimal plan P between xi_0 and xi_1 and move
every piece of mass P_ij from x_i to y_j along the straight line, stopping at
``(1 - alpha) x_i + alpha y_j``. Mass *moves*. The *linear mixture*
``(1 - alpha) xi_0 + alpha xi_1`` instead fades one measure out and the other in: mass stays put
and the halfway point shows both ends at once (the "ghosting" of a cross-dissolve).

Conventions used throughout:

* ``alpha`` is the weight of the *second* measure: alpha = 0 gives xi_0, alpha = 1 gives xi_1;
  POT's ``weights`` argument is ``[1 - alpha, alpha]``.
* A 1D histogram is a non-negative array ``h`` of shape (n,) on sorted bin positions ``x`` of
  shape (n,); histograms are normalised to sum 1 on entry.
* A point cloud is an array of shape (k, d) with uniform weights 1/k unless weights are given.
* An image is a non-negative 2D array (H, W) read as a histogram on the pixel grid; POT's
  convolutional solver maps each image axis to [0, 1].
* Ground cost is the squared Euclidean distance ``|x - y|^2``; entropic regularisation strengths
  ``reg`` are in the same units (squared positions).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import ot
import torch

from .runtime import one_torch_thread

__all__ = [
    "normalize_histogram", "gaussian_histogram", "histogram_mean_std", "linear_mixture",
    "displacement_interpolation_1d", "w2_distance_1d", "lp_barycenter_1d", "entropic_barycenter_1d",
    "displacement_interpolation_points", "free_support_barycenter", "convolutional_barycenter",
    "disc_image", "ring_image", "square_image", "image_centroid", "SINKHORN_METHODS",
]

#: Solvers accepted by the entropic functions: log-domain (stable) first, then the plain one.
SINKHORN_METHODS = ("sinkhorn_log", "sinkhorn")


# --------------------------------------------------------------------------------------------
# Checks and small helpers
# --------------------------------------------------------------------------------------------

def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}.")
    return alpha


def normalize_histogram(h: np.ndarray) -> np.ndarray:
    """Return ``h / h.sum()`` as float64 (any shape); ValueError if negative, NaN or all zero."""
    h = np.asarray(h, dtype=np.float64)
    if not np.all(np.isfinite(h)) or np.any(h < 0):
        raise ValueError("A histogram must hold finite, non-negative values.")
    total = h.sum()
    if total <= 0:
        raise ValueError("A histogram must have positive total mass.")
    return h / total


def _check_grid(x: np.ndarray, n: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or x.shape[0] != n:
        raise ValueError(f"Bin positions must have shape ({n},), got {x.shape}.")
    if n > 1 and np.any(np.diff(x) <= 0):
        raise ValueError("Bin positions must be strictly increasing.")
    return x


def _check_pair_1d(h0, h1, x):
    h0, h1 = np.asarray(h0), np.asarray(h1)
    if h0.ndim != 1 or h0.shape != h1.shape:
        raise ValueError(f"Expected two 1D histograms of one length, got {h0.shape} and {h1.shape}.")
    n = h0.shape[0]
    x = np.arange(n, dtype=np.float64) if x is None else _check_grid(x, n)
    return normalize_histogram(h0), normalize_histogram(h1), x


def gaussian_histogram(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    """The N(mean, std^2) density sampled on bin positions ``x`` (n,), normalised to sum 1."""
    if std <= 0:
        raise ValueError(f"std must be positive, got {std}.")
    x = np.asarray(x, dtype=np.float64)
    return normalize_histogram(np.exp(-0.5 * ((x - mean) / std) ** 2))


def histogram_mean_std(h: np.ndarray, x: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of the histogram ``h`` (n,) on positions ``x`` (n,)."""
    h = normalize_histogram(h)
    x = np.asarray(x, dtype=np.float64)
    mean = float(np.sum(h * x))
    return mean, float(np.sqrt(max(np.sum(h * (x - mean) ** 2), 0.0)))


def linear_mixture(a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    """The mixture ``(1 - alpha) a + alpha b`` of two histograms or images of one shape.

    This is the L2 (cross-dissolve) path, shown for contrast with the Wasserstein one: it keeps
    every bin where it is and only changes the weights.
    """
    alpha = _check_alpha(alpha)
    a, b = normalize_histogram(a), normalize_histogram(b)
    if a.shape != b.shape:
        raise ValueError(f"Cannot mix arrays of shapes {a.shape} and {b.shape}.")
    return (1.0 - alpha) * a + alpha * b


def _backend_array(array, method: str):
    """float64 array for POT: a torch tensor for the log-domain solver (POT's torch backend runs
    its log-sum-exp iterations several times faster on the CPU than its numpy one), numpy
    otherwise."""
    array = np.asarray(array, dtype=np.float64)
    return torch.as_tensor(array) if method == "sinkhorn_log" else array


def _check_entropic(reg: float, method: str) -> None:
    if not reg > 0:
        raise ValueError(f"reg must be positive, got {reg}.")
    if method not in SINKHORN_METHODS:
        raise ValueError(f"Unknown method '{method}': use one of {', '.join(SINKHORN_METHODS)}.")


def _entropic_result(bary) -> np.ndarray:
    """Normalised numpy copy of a Sinkhorn barycenter; a clear error when it under/overflowed."""
    bary = bary.detach().cpu().numpy() if isinstance(bary, torch.Tensor) else np.asarray(bary)
    if not np.all(np.isfinite(bary)) or bary.sum() <= 0:
        raise ValueError("The Sinkhorn iterations under- or overflowed: raise reg or use "
                         "method='sinkhorn_log'.")
    return normalize_histogram(np.clip(bary, 0.0, None))


def _cell_edges(x: np.ndarray) -> np.ndarray:
    """Edges (n + 1,) of the cells around bin positions x (n,): halfway between neighbours, the
    outer cells as wide as their inner neighbour's half-gap doubled (width 1 when n = 1)."""
    if x.shape[0] == 1:
        return np.array([x[0] - 0.5, x[0] + 0.5])
    mid = 0.5 * (x[1:] + x[:-1])
    return np.concatenate([[2 * x[0] - mid[0]], mid, [2 * x[-1] - mid[-1]]])


def _quantile_segments(h: np.ndarray, edges: np.ndarray, levels: np.ndarray):
    """Values of the quantile function Q of the cell-uniform density of ``h`` at both ends of
    each interval (levels[k], levels[k+1]), using the linear piece valid inside the interval."""
    cdf = np.cumsum(h)
    cdf[-1] = 1.0
    mid = 0.5 * (levels[1:] + levels[:-1])
    cell = np.minimum(np.searchsorted(cdf, mid, side="right"), len(h) - 1)
    below, mass = cdf[cell] - h[cell], h[cell]
    left, width = edges[cell], edges[cell + 1] - edges[cell]

    def position(level):
        share = np.divide(level - below, mass, out=np.zeros_like(mass), where=mass > 0)
        return left + np.clip(share, 0.0, 1.0) * width

    return position(levels[:-1]), position(levels[1:])


# --------------------------------------------------------------------------------------------
# 1D histograms
# --------------------------------------------------------------------------------------------

def displacement_interpolation_1d(h0: np.ndarray, h1: np.ndarray, alpha: float,
                                  x: Optional[np.ndarray] = None) -> np.ndarray:
    """Exact W2 barycenter of two 1D histograms by displacement interpolation (McCann).

    Each histogram is read as a density that is uniform on the cell around each bin position
    (cell edges halfway between positions). In 1D the optimal plan matches quantiles, so the
    barycenter minimising ``(1 - alpha) W2^2(h0, h) + alpha W2^2(h1, h)`` has the quantile
    function ``Q_alpha(u) = (1 - alpha) Q_0(u) + alpha Q_1(u)``, u in [0, 1]. It is computed
    exactly (both quantile functions are piecewise linear) and its mass is binned back onto the
    cells. A histogram shifted by a whole number of bins comes back exactly shifted; the mean is
    exact up to where mass sits inside its cell.

    Args:
        h0, h1: non-negative histograms (n,), normalised here.
        alpha: weight of ``h1`` in [0, 1].
        x: strictly increasing bin positions (n,); default ``0, 1, ..., n - 1``.

    Returns:
        The histogram (n,) of the interpolant, summing to 1.
    """
    alpha = _check_alpha(alpha)
    h0, h1, x = _check_pair_1d(h0, h1, x)
    edges = _cell_edges(x)
    levels = np.unique(np.concatenate([[0.0, 1.0], np.clip(np.cumsum(h0), 0, 1),
                                       np.clip(np.cumsum(h1), 0, 1)]))
    start0, end0 = _quantile_segments(h0, edges, levels)
    start1, end1 = _quantile_segments(h1, edges, levels)
    lo = (1.0 - alpha) * start0 + alpha * start1   # each level interval maps to [lo, hi]
    hi = (1.0 - alpha) * end0 + alpha * end1       # with its mass spread uniformly
    mass = np.diff(levels)
    span = np.maximum(hi - lo, 1e-300)
    covered = np.clip((edges[:, None] - lo[None, :]) / span[None, :], 0.0, 1.0)
    cdf_at_edges = covered @ mass
    return normalize_histogram(np.clip(np.diff(cdf_at_edges), 0.0, None))


def w2_distance_1d(h0: np.ndarray, h1: np.ndarray, x: Optional[np.ndarray] = None) -> float:
    """The 2-Wasserstein distance between two histograms on bin positions ``x`` (point masses at
    the positions), ``sqrt(min_P sum_ij P_ij (x_i - x_j)^2)``, via ``ot.wasserstein_1d``."""
    h0, h1, x = _check_pair_1d(h0, h1, x)
    return float(np.sqrt(ot.wasserstein_1d(x, x, h0, h1, p=2)))


def _squared_cost(x: np.ndarray) -> np.ndarray:
    return (x[:, None] - x[None, :]) ** 2


def lp_barycenter_1d(h0: np.ndarray, h1: np.ndarray, alpha: float,
                     x: Optional[np.ndarray] = None) -> np.ndarray:
    """Exact W2 barycenter of two histograms supported on the fixed grid ``x`` (linear program).

    Solves ``argmin_h (1 - alpha) W2^2(h0, h) + alpha W2^2(h1, h)`` over histograms h on the same
    bins with ``ot.lp.barycenter`` (cost ``M_ij = (x_i - x_j)^2``). Where the true barycenter puts
    mass between two bins, the grid-restricted optimum has to round it onto nearby bins, so its
    curve is jagged; as a distribution it stays within about a bin width (in W2) of
    :func:`displacement_interpolation_1d`. The LP has 2 n^2 + n unknowns: keep n to a few
    hundred bins.

    Args:
        h0, h1: non-negative histograms (n,); alpha: weight of ``h1`` in [0, 1];
        x: bin positions (n,), default ``0 .. n-1``.

    Returns:
        The barycenter histogram (n,), summing to 1 (tiny solver negatives clipped).
    """
    alpha = _check_alpha(alpha)
    h0, h1, x = _check_pair_1d(h0, h1, x)
    A = np.stack([h0, h1], axis=1)
    bary = ot.lp.barycenter(A, _squared_cost(x), weights=np.array([1.0 - alpha, alpha]))
    return normalize_histogram(np.clip(bary, 0.0, None))


def entropic_barycenter_1d(h0: np.ndarray, h1: np.ndarray, alpha: float, reg: float,
                           x: Optional[np.ndarray] = None, num_iter: int = 5000,
                           method: str = "sinkhorn_log") -> np.ndarray:
    """Entropic W2 barycenter of two histograms on the grid ``x`` (iterative Bregman projections).

    Solves ``argmin_h (1 - alpha) W_reg(h0, h) + alpha W_reg(h1, h)`` with
    ``W_reg(a, b) = min_P <P, M> - reg H(P)``, ``M_ij = (x_i - x_j)^2``, by
    ``ot.bregman.barycenter``. The entropy term blurs the result: the barycenter is wider than the
    exact one, by more as ``reg`` grows, and converges to it as ``reg -> 0``.

    Args:
        h0, h1: non-negative histograms (n,); alpha: weight of ``h1`` in [0, 1];
        reg: regularisation strength > 0, in squared units of ``x``;
        x: bin positions (n,), default ``0 .. n-1``;
        num_iter: maximum Sinkhorn iterations;
        method: ``"sinkhorn_log"`` (log domain, stable for any ``reg``) or ``"sinkhorn"``
            (faster, but its kernel underflows once ``reg`` is small against the costs).

    Returns:
        The barycenter histogram (n,), summing to 1.
    """
    alpha = _check_alpha(alpha)
    _check_entropic(reg, method)
    h0, h1, x = _check_pair_1d(h0, h1, x)
    A = _backend_array(np.stack([h0, h1], axis=1), method)
    M = _backend_array(_squared_cost(x), method)
    weights = _backend_array([1.0 - alpha, alpha], method)
    with one_torch_thread(), np.errstate(all="ignore"):
        bary = ot.bregman.barycenter(A, M, reg, weights=weights, method=method,
                                     numItermax=num_iter, stopThr=1e-7, warn=False)
    return _entropic_result(bary)


# --------------------------------------------------------------------------------------------
# Point clouds
# --------------------------------------------------------------------------------------------

def _check_cloud(X: np.ndarray, name: str) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty point cloud of shape (k, d), got {X.shape}.")
    return X


def displacement_interpolation_points(X0: np.ndarray, X1: np.ndarray, alpha: float) -> np.ndarray:
    """Displacement interpolation between two clouds of k points each, with uniform weights.

    The exact plan between equal-size uniform clouds is a permutation sigma (``ot.emd`` on the
    cost ``|X0_i - X1_j|^2``); the interpolant is the cloud
    ``(1 - alpha) X0_i + alpha X1_sigma(i)``, the W2 barycenter with weights ``[1 - alpha, alpha]``.

    Args:
        X0, X1: arrays (k, d); alpha: weight of ``X1`` in [0, 1].

    Returns:
        Array (k, d), row i being the position of X0's point i at time alpha.
    """
    alpha = _check_alpha(alpha)
    X0, X1 = _check_cloud(X0, "X0"), _check_cloud(X1, "X1")
    if X0.shape != X1.shape:
        raise ValueError(f"Both clouds need the same shape (k, d), got {X0.shape} and {X1.shape}.")
    k = X0.shape[0]
    plan = ot.emd(np.full(k, 1.0 / k), np.full(k, 1.0 / k), ot.dist(X0, X1))
    sigma = plan.argmax(axis=1)
    return (1.0 - alpha) * X0 + alpha * X1[sigma]


def free_support_barycenter(X0: np.ndarray, X1: np.ndarray, alpha: float,
                            n_points: Optional[int] = None, X_init: Optional[np.ndarray] = None,
                            a0: Optional[np.ndarray] = None, a1: Optional[np.ndarray] = None,
                            num_iter: int = 100, seed: int = 0) -> np.ndarray:
    """W2 barycenter of two point clouds with free support (the points themselves move).

    Solves ``argmin_X (1 - alpha) W2^2(mu_0, nu_X) + alpha W2^2(mu_1, nu_X)`` over clouds X of
    ``n_points`` uniformly weighted points, with ``ot.lp.free_support_barycenter`` (a fixed
    point iteration: solve both exact plans, move each point to the weighted average of its
    matches). The clouds may differ in size but not in dimension.

    Args:
        X0, X1: arrays (k0, d) and (k1, d); alpha: weight of ``X1`` in [0, 1].
        n_points: size of the barycenter (default k0); ignored when ``X_init`` is given.
        X_init: starting positions (k, d); default ``n_points`` rows of X0 and X1 drawn at random
            (seeded) and mixed with weights ``1 - alpha``, ``alpha``.
        a0, a1: weights of the points of X0 and X1 (default uniform).
        num_iter: maximum fixed-point iterations; seed: for the default ``X_init``.

    Returns:
        Array (k, d) of barycenter points.
    """
    alpha = _check_alpha(alpha)
    X0, X1 = _check_cloud(X0, "X0"), _check_cloud(X1, "X1")
    if X0.shape[1] != X1.shape[1]:
        raise ValueError(f"Both clouds need the same dimension, got {X0.shape[1]} and {X1.shape[1]}.")
    a0 = np.full(len(X0), 1.0 / len(X0)) if a0 is None else normalize_histogram(a0)
    a1 = np.full(len(X1), 1.0 / len(X1)) if a1 is None else normalize_histogram(a1)
    if X_init is None:
        k = len(X0) if n_points is None else int(n_points)
        if k <= 0:
            raise ValueError(f"n_points must be positive, got {k}.")
        rng = np.random.default_rng(seed)
        X_init = ((1.0 - alpha) * X0[rng.integers(len(X0), size=k)]
                  + alpha * X1[rng.integers(len(X1), size=k)])
    X_init = _check_cloud(X_init, "X_init")
    if X_init.shape[1] != X0.shape[1]:
        raise ValueError(f"X_init must have dimension {X0.shape[1]}, got {X_init.shape[1]}.")
    return ot.lp.free_support_barycenter([X0, X1], [a0, a1], X_init,
                                         weights=np.array([1.0 - alpha, alpha]),
                                         numItermax=num_iter, stopThr=1e-9)


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

def convolutional_barycenter(image0: np.ndarray, image1: np.ndarray, alpha: float,
                             reg: float = 0.002, num_iter: int = 2000,
                             method: str = "sinkhorn_log") -> np.ndarray:
    """Entropic W2 barycenter of two greyscale images read as histograms on the pixel grid.

    Solves ``argmin_a (1 - alpha) W_reg(a0, a) + alpha W_reg(a1, a)`` with
    ``ot.bregman.convolutional_barycenter2d``: Sinkhorn iterations in which the Gibbs kernel
    ``exp(-|p - q|^2 / reg)`` is applied as two 1D convolutions, never as an (HW)^2 matrix
    (Solomon et al. 2015). POT places pixel centres on ``linspace(0, 1, H) x linspace(0, 1, W)``,
    so ``reg`` is in units of (image side)^2: about ``(blur radius in pixels / side)^2``.

    Args:
        image0, image1: non-negative arrays (H, W) of one shape, normalised to sum 1 here.
        alpha: weight of ``image1`` in [0, 1]; reg: entropic strength > 0;
        num_iter: maximum Sinkhorn iterations;
        method: ``"sinkhorn_log"`` (log domain, stable) or ``"sinkhorn"`` (faster, but it
            underflows, or silently loses accuracy, once ``reg`` is below about 0.004).

    Returns:
        The barycenter (H, W), summing to 1.
    """
    alpha = _check_alpha(alpha)
    _check_entropic(reg, method)
    image0, image1 = normalize_histogram(image0), normalize_histogram(image1)
    if image0.ndim != 2 or image0.shape != image1.shape:
        raise ValueError(f"Expected two 2D images of one shape, got {image0.shape} and {image1.shape}.")
    with one_torch_thread(), np.errstate(all="ignore"):
        bary = ot.bregman.convolutional_barycenter2d(
            _backend_array(np.stack([image0, image1]), method), reg,
            weights=_backend_array([1.0 - alpha, alpha], method), method=method,
            numItermax=num_iter, stopThr=1e-6, warn=False)
    return _entropic_result(bary)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    if size < 4:
        raise ValueError(f"Image size must be at least 4 pixels, got {size}.")
    rows, cols = np.mgrid[0:size, 0:size]
    return rows.astype(np.float64), cols.astype(np.float64)


def disc_image(size: int, center: Sequence[float], radius: float) -> np.ndarray:
    """A (size, size) float image: 1 inside the disc of ``radius`` pixels around ``center``
    = (row, col), 0 outside."""
    r, c = _grid(size)
    return ((r - center[0]) ** 2 + (c - center[1]) ** 2 <= radius ** 2).astype(np.float64)


def ring_image(size: int, center: Sequence[float], radius: float, width: float) -> np.ndarray:
    """A (size, size) float image: 1 on the annulus ``radius - width < |p - center| <= radius``."""
    r, c = _grid(size)
    d = np.sqrt((r - center[0]) ** 2 + (c - center[1]) ** 2)
    return ((d <= radius) & (d > radius - width)).astype(np.float64)


def square_image(size: int, center: Sequence[float], half_side: float) -> np.ndarray:
    """A (size, size) float image: 1 on the axis-aligned square ``|row - center_row| <= half_side``
    and ``|col - center_col| <= half_side``."""
    r, c = _grid(size)
    inside = (np.abs(r - center[0]) <= half_side) & (np.abs(c - center[1]) <= half_side)
    return inside.astype(np.float64)


def image_centroid(image: np.ndarray) -> np.ndarray:
    """Centre of mass (row, col) of a non-negative image (H, W), in pixels."""
    image = normalize_histogram(image)
    if image.ndim != 2:
        raise ValueError(f"Expected a 2D image, got shape {image.shape}.")
    rows, cols = np.indices(image.shape)
    return np.array([np.sum(image * rows), np.sum(image * cols)])
