"""Choosing the alphas of the frames (IMPUS stage 9; notebook 06).

Every function here sees the morph only through two callables, so it is tested on paths whose
distances are known in closed form:

* ``render(alphas) -> frames``: a list of K floats in [0, 1] -> tensor (K, 3, H, W) in [-1, 1];
* ``distance(a, b) -> d``: frames (K, ...) against frames (K, ...) or (1, ...) -> (K,) floats.

Schedules:

* :func:`uniform_alphas`: ``alpha_k = k / (K-1)``.
* :func:`beta_alphas`: quantiles of a Beta(a, b) prior (AID/PAID).
* :func:`perceptual_search`: IMPUS's perceptually-uniform sampling. From the current frame,
  search the next alpha in (current, 1] until ``|d(current, candidate) - step| <= tol``; stop
  once the current frame is within ``step`` of the end frame; append alpha = 1. With
  ``candidates = 1`` this is the reference's binary search; with m > 1 each round renders m
  candidates as one batch and shrinks the interval m + 1 times (fewer rounds, better for GPUs).
* :func:`search_frame_count`: the step that makes :func:`perceptual_search` return exactly N
  frames (bisection on the step), which the reference cannot do.
* :func:`reschedule_alphas`: DiffMorpher's reschedule: accumulate consecutive distances, invert
  the cumulative curve piecewise-linearly for N even steps.
* :func:`rescheduled_search`: the reschedule iterated. From the second reschedule on, the curve
  runs through every frame rendered so far (:func:`distance_curve`), with distances raised to
  the power that makes them add up (:func:`fit_distance_power`).

All searches memoise rendered frames by alpha, so frames found during a search are reused as
output frames and never rendered twice.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .errors import InputError

Render = Callable[[Sequence[float]], torch.Tensor]
Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def uniform_alphas(frames: int) -> list[float]:
    """``frames`` evenly spaced alphas from 0 to 1 inclusive."""
    _check_frames(frames)
    return [float(a) for a in np.linspace(0.0, 1.0, frames)]


def beta_alphas(frames: int, a: float = 1.0, b: float = 1.0) -> list[float]:
    """Alphas at the quantiles ``F^{-1}(k / (K-1))`` of a Beta(a, b) distribution (AID's prior).

    a = b = 1 gives uniform alphas; a = b > 1 crowds frames near the middle, where most change.
    """
    from scipy.stats import beta

    _check_frames(frames)
    if a <= 0 or b <= 0:
        raise InputError(f"Beta prior parameters must be positive, got a={a}, b={b}.")
    q = beta.ppf(np.linspace(0.0, 1.0, frames), a, b)
    q[0], q[-1] = 0.0, 1.0
    return [float(x) for x in q]


def _check_frames(frames: int) -> None:
    if not isinstance(frames, (int, np.integer)) or frames < 2:
        raise InputError(f"A morph needs at least 2 frames, got {frames}.")


class FrameCache:
    """Frames rendered so far, by alpha; renders missing alphas in batches of ``batch_size``
    (None: all missing alphas in one call, for a ``render`` that batches them itself, as
    :meth:`impus_lite.morph.Morpher.render` does)."""

    def __init__(self, render: Render, batch_size: Optional[int] = 8):
        self.render = render
        self.batch_size = None if batch_size is None else max(1, int(batch_size))
        self.frames: dict[float, torch.Tensor] = {}
        self.renders = 0

    def get(self, alphas: Sequence[float]) -> torch.Tensor:
        """Frames (K, 3, H, W) at ``alphas``, rendering only the ones not seen before."""
        alphas = [float(a) for a in alphas]
        missing = sorted({a for a in alphas if a not in self.frames})
        step = self.batch_size or max(1, len(missing))
        for start in range(0, len(missing), step):
            chunk = missing[start:start + step]
            images = self.render(chunk)
            self.renders += len(chunk)
            for a, image in zip(chunk, images):
                self.frames[a] = image.detach().cpu()
        return torch.stack([self.frames[a] for a in alphas])


@dataclass
class Schedule:
    """Alphas chosen for a morph, with the frames and their consecutive distances.

    Attributes:
        alphas: K increasing floats from 0 to 1.
        frames: (K, 3, H, W) in [-1, 1].
        distances: K-1 consecutive distances ``d(x_k, x_{k+1})``.
        step: the distance step the search aimed at (None for fixed schedules).
        renders: how many frames were rendered to choose them (K for fixed schedules).
    """

    alphas: list[float]
    frames: torch.Tensor
    distances: list[float]
    step: float | None = None
    renders: int = 0
    notes: list[str] = field(default_factory=list)


def _consecutive(frames: torch.Tensor, distance: Distance) -> list[float]:
    return [float(d) for d in torch.as_tensor(distance(frames[:-1], frames[1:])).reshape(-1)]


def fixed_schedule(alphas: Sequence[float], cache: FrameCache, distance: Distance) -> Schedule:
    """Render the given alphas and measure their consecutive distances."""
    frames = cache.get(alphas)
    return Schedule(list(alphas), frames, _consecutive(frames, distance), None, cache.renders)


def perceptual_search(cache: FrameCache, distance: Distance, step: float, tol: float = 0.01,
                      candidates: int = 1, max_frames: int = 64, min_interval: float = 1e-8,
                      warn: bool = True) -> Schedule:
    """IMPUS's perceptually-uniform sampling (see the module docstring).

    Assumes ``d(current, x(alpha))`` grows with alpha; where it does not, the search still ends
    (the interval shrinks below ``min_interval``) and takes the candidate nearest the step.

    Args:
        cache: a :class:`FrameCache` over the morph's render function.
        step: target distance between consecutive frames (IMPUS: LPIPS 0.2).
        tol: accept a candidate when ``|d - step| <= tol`` (IMPUS: 0.01).
        candidates: alphas rendered per round (1: binary search).
        max_frames: stop adding frames at this count (the end frame is still appended).
        warn: warn when ``max_frames`` stops the search.
    """
    if step <= 0:
        raise InputError(f"The distance step must be positive, got {step}.")
    if max_frames < 2:
        raise InputError(f"max_frames must be at least 2, got {max_frames}.")
    end = cache.get([1.0])
    alphas = [0.0]
    current = cache.get([0.0])
    notes = []
    while len(alphas) < max_frames - 1 and float(distance(current, end)[0]) > step:
        lo, hi = alphas[-1], 1.0
        best_alpha, best_gap = None, math.inf
        while True:
            grid = [lo + (hi - lo) * (k + 1) / (candidates + 1) for k in range(candidates)]
            d = [float(x) for x in torch.as_tensor(distance(current, cache.get(grid))).reshape(-1)]
            for a, dist in zip(grid, d):
                if abs(dist - step) < best_gap:
                    best_alpha, best_gap = a, abs(dist - step)
            if best_gap <= tol or hi - lo < min_interval:
                break
            above = [k for k, dist in enumerate(d) if dist > step]
            if above:
                hi = grid[above[0]]
                lo = grid[above[0] - 1] if above[0] > 0 else lo
            else:
                lo = grid[-1]
        alphas.append(best_alpha)
        current = cache.get([best_alpha])
    if len(alphas) >= max_frames - 1 and float(distance(current, end)[0]) > step:
        notes.append(f"stopped at max_frames={max_frames} before reaching the end frame")
        if warn:
            warnings.warn(f"The alpha search stopped at {max_frames} frames: raise max_frames or the step.")
    alphas.append(1.0)
    frames = cache.get(alphas)
    return Schedule(alphas, frames, _consecutive(frames, distance), step, cache.renders, notes)


def search_frame_count(cache: FrameCache, distance: Distance, frames: int, tol: float = 0.01,
                       candidates: int = 1, iterations: int = 10) -> Schedule:
    """The perceptual search with the step chosen so that it yields exactly ``frames`` frames.

    The frame count of :func:`perceptual_search` falls as the step grows, and at the smallest
    step that gives ``frames`` frames the last gap (to the end frame) equals the step: every
    gap is then even. A first guess is the mean consecutive distance of ``frames`` uniform
    frames; the step is bracketed and bisected (on its logarithm) towards that boundary. The
    search's tolerance is ``min(tol, step / 4)``; renders are shared between the passes. When no
    step gives exactly ``frames`` (a path with a jump), the closest count is rescheduled with
    :func:`reschedule_alphas` to ``frames`` alphas.
    """
    _check_frames(frames)
    if frames == 2:
        return fixed_schedule([0.0, 1.0], cache, distance)
    probe = fixed_schedule(uniform_alphas(frames), cache, distance)
    guess = float(np.mean(probe.distances))
    if guess <= 0:
        return probe
    runs: dict[float, Schedule] = {}

    def count(step: float) -> int:
        if step not in runs:
            runs[step] = perceptual_search(cache, distance, step, tol=min(tol, step / 4),
                                           candidates=candidates, max_frames=frames + 1, warn=False)
        return len(runs[step].alphas)

    lo = hi = guess                               # lo: more than `frames` frames; hi: at most
    for _ in range(iterations):
        if count(lo) > frames:
            break
        lo /= 1.5
    for _ in range(iterations):
        if count(hi) <= frames:
            break
        hi *= 1.5
    for _ in range(iterations):
        if count(hi) == frames and (hi - lo) / hi < 0.02:
            break
        mid = math.sqrt(lo * hi)
        if count(mid) > frames:
            lo = mid
        else:
            hi = mid
    best = runs[hi] if hi in runs and count(hi) == frames else None
    if best is None:
        nearest = min(runs.values(), key=lambda r: abs(len(r.alphas) - frames))
        best = fixed_schedule(reschedule_alphas(nearest.alphas, nearest.distances, frames), cache, distance)
        best.step = float(np.mean(best.distances))
        best.notes.append("no step gives exactly this many frames; rescheduled the closest search")
    best.renders = cache.renders
    return best


def reschedule_alphas(alphas: Sequence[float], distances: Sequence[float], frames: int) -> list[float]:
    """Alphas at which the cumulative distance curve is evenly divided into ``frames - 1`` steps.

    The curve is ``C(alpha_k) = sum_{j<k} d_j`` over the rendered ``alphas`` (sorted, with 0 and
    1), linear in between; the new alphas are ``C^{-1}(k C(1) / (frames - 1))`` (DiffMorpher).
    """
    a = np.asarray(alphas, dtype=np.float64)
    d = np.asarray(distances, dtype=np.float64)
    if a.size != d.size + 1 or a.size < 2:
        raise InputError("reschedule_alphas needs K alphas and K-1 distances.")
    if np.any(np.diff(a) <= 0):
        raise InputError("reschedule_alphas needs increasing alphas.")
    return invert_curve(a, np.concatenate([[0.0], np.cumsum(np.maximum(d, 1e-12))]), frames)


def invert_curve(alphas: np.ndarray, cumulative: np.ndarray, frames: int) -> list[float]:
    """``C^{-1}(k C(1) / (frames - 1))`` for k = 0..frames-1, C linear between its knots.

    Args:
        alphas: (K,) increasing knots from 0 to 1.
        cumulative: (K,) non-decreasing curve values at the knots, starting at 0.
    """
    _check_frames(frames)
    new = np.interp(np.linspace(0.0, cumulative[-1], frames), cumulative, alphas)
    new[0], new[-1] = 0.0, 1.0
    return [float(x) for x in new]


def _fine_distances(schedule: Schedule, cache: FrameCache, distance: Distance):
    """Per gap of ``schedule``: the rendered alphas inside it (ends included) and their
    consecutive distances, or ``None`` for a gap with nothing rendered inside."""
    rendered = sorted(cache.frames)
    out = []
    for lo, hi in zip(schedule.alphas[:-1], schedule.alphas[1:]):
        knots = [lo] + [a for a in rendered if lo < a < hi] + [hi]
        fine = None
        if len(knots) > 2:
            fine = np.maximum(np.asarray(_consecutive(cache.get(knots), distance)), 1e-12)
        out.append((knots, fine))
    return out


def fit_distance_power(coarse: Sequence[float], fine: Sequence[Optional[np.ndarray]], default: float = 1.0,
                       bounds: tuple[float, float] = (0.25, 2.0)) -> float:
    """The exponent p with which distances add up along the path.

    For each gap of length ``D_k`` that holds finer frames with consecutive distances
    ``delta_ki``, additivity of ``d^p`` means ``sum_i (delta_ki / D_k)^p = 1``; p solves the sum
    of these equations over the gaps, ``sum_k (sum_i (delta_ki / D_k)^p - 1) = 0`` (Brent's
    method, clipped to ``bounds``). An additive distance gives p = 1. LPIPS is a weighted sum of
    squared feature differences, so for small steps along a straight path it grows like the
    square of the step and p is near 1/2; on the classroom model's paths the fit gives 0.55-0.6.
    Gaps without finer frames (``None``) are skipped; with none at all, ``default`` is returned.
    """
    from scipy.optimize import brentq

    ratios = [np.asarray(f, dtype=np.float64) / max(float(D), 1e-12) for D, f in zip(coarse, fine)
              if f is not None]                      # delta_ki / D_k, one array per gap
    if not ratios:
        return float(default)

    def excess(p: float) -> float:
        return float(sum((r ** p).sum() - 1.0 for r in ratios))

    lo, hi = bounds
    if excess(lo) <= 0:
        return float(lo)
    if excess(hi) >= 0:
        return float(hi)
    return float(brentq(excess, lo, hi, xtol=1e-4))


def distance_curve(schedule: Schedule, cache: FrameCache, distance: Distance,
                   power: Optional[float] = None) -> tuple[np.ndarray, np.ndarray, float]:
    """The cumulative distance curve of ``schedule``'s path through every frame in ``cache``.

    Between two consecutive frames of ``schedule`` (gap ``D_k``) the curve rises by ``D_k^p``,
    shared among the frames rendered inside the gap in proportion to ``delta_ki^p``: the
    schedule's own gaps set the scale (they are what the result is judged on) and the finer
    frames say where inside a gap the change happens. ``p`` is :func:`fit_distance_power`
    unless ``power`` is given. Equal steps of this curve are equal steps of ``d^p``, so of ``d``.

    Returns:
        (alphas, cumulative, p): knots (K,) from 0 to 1, curve values (K,) from 0, the exponent.
    """
    fine = _fine_distances(schedule, cache, distance)
    p = fit_distance_power(schedule.distances, [f for _, f in fine]) if power is None else float(power)
    knots, curve = [0.0], [0.0]
    for gap, (inside, f) in zip(schedule.distances, fine):
        share = np.array([1.0]) if f is None else np.cumsum(f ** p) / np.sum(f ** p)
        knots += inside[1:]
        curve += list(curve[-1] + max(gap, 1e-12) ** p * share)
    return np.asarray(knots), np.asarray(curve), p


def rescheduled_search(cache: FrameCache, distance: Distance, frames: Optional[int], passes: int = 2,
                       rel_tol: float = 0.05, step: Optional[float] = None, max_frames: int = 64,
                       probe_frames: int = 9, damping: float = 0.0,
                       power: Optional[float] = None) -> Schedule:
    """DiffMorpher's reschedule, iterated: uniform alphas, then up to ``passes - 1`` reschedules.

    Each pass inverts :func:`distance_curve` of the previous pass: the previous pass's own gaps
    set the curve's scale (LPIPS is not additive, so the sum of finer distances would aim at
    the wrong steps), every frame rendered so far says where inside a gap the change happens,
    and distances are raised to the fitted power that makes them add up (about 1/2 for LPIPS
    over small steps). The first reschedule has no finer frames and is DiffMorpher's exactly.
    Then the alphas move part way: ``alpha <- (1 - damping) * reschedule(alpha) + damping *
    alpha`` (0: the full step). On the classroom model's paths this evens out a near-step path
    (most change within 0.005 of alpha) in five reschedules, which the coarse curve alone did
    not (README, "Cost and speed").

    Returns the most even pass (smallest variance of its distances) and stops early once every
    distance is within ``rel_tol`` times their mean of the mean (relative, so it means the same
    for any distance's scale; IMPUS's tolerance 0.01 on a step of 0.2 is 0.05). With
    ``frames=None`` the count follows from ``step`` as in IMPUS: ``ceil(L / step) + 1`` for the
    path length L measured on ``probe_frames`` uniform frames (capped at ``max_frames``).
    ``power`` fixes the exponent instead of fitting it (1: plain distances).
    """
    if frames is None:
        if step is None or step <= 0:
            raise InputError("The reschedule needs a frame count or a positive distance step.")
        probe = fixed_schedule(uniform_alphas(probe_frames), cache, distance)
        frames = int(min(max_frames, max(2, math.ceil(sum(probe.distances) / step) + 1)))
    _check_frames(frames)
    if passes < 1:
        raise InputError(f"The reschedule needs at least one pass, got {passes}.")
    if not 0.0 <= damping < 1.0:
        raise InputError(f"The reschedule's damping must be in [0, 1), got {damping}.")
    schedule = best = fixed_schedule(uniform_alphas(frames), cache, distance)
    powers = []
    for _ in range(passes - 1):
        d = np.asarray(schedule.distances)
        if np.all(np.abs(d - d.mean()) <= rel_tol * d.mean()):
            break
        knots, curve, p = distance_curve(schedule, cache, distance, power)
        powers.append(p)
        target = np.asarray(invert_curve(knots, curve, frames))
        alphas = (1.0 - damping) * target + damping * np.asarray(schedule.alphas)
        schedule = fixed_schedule([float(a) for a in alphas], cache, distance)
        if np.var(schedule.distances) < np.var(best.distances):
            best = schedule
    best.step = float(np.mean(best.distances))
    best.renders = cache.renders
    if powers:
        best.notes.append("distance exponent per reschedule: " + ", ".join(f"{p:.2f}" for p in powers))
    return best


def choose_schedule(config, cache: FrameCache, distance) -> Schedule:
    """The alphas and frames that ``config``'s schedule picks, rendering through ``cache``.

    ``config`` is a :class:`~impus_lite.config.MorphConfig`. "uniform" and "beta" render ``config.frames`` fixed alphas; "reschedule" runs
    :func:`~impus_lite.schedules.rescheduled_search`; "perceptual" runs IMPUS's search for the
    LPIPS step, or :func:`~impus_lite.schedules.search_frame_count` when ``frames`` is set.
    A trained :class:`Morpher` can try several schedules: ``FrameCache(morpher.render)``.
    """
    c = config
    if c.schedule == "uniform":
        return fixed_schedule(uniform_alphas(c.frames), cache, distance)
    if c.schedule == "beta":
        return fixed_schedule(beta_alphas(c.frames, c.beta_a, c.beta_b), cache, distance)
    if c.schedule == "reschedule":
        return rescheduled_search(cache, distance, c.frames, c.reschedule_passes,
                                  rel_tol=c.lpips_tol / c.lpips_step, step=c.lpips_step,
                                  max_frames=c.max_frames, damping=c.reschedule_damping)
    if c.frames is not None:
        return search_frame_count(cache, distance, c.frames, c.lpips_tol, c.search_candidates)
    return perceptual_search(cache, distance, c.lpips_step, c.lpips_tol, c.search_candidates, c.max_frames)
