"""Alpha schedules on a path whose distances are known in closed form.

Frames are constant images x(a) = a^2 (every pixel), and the distance is the mean absolute
difference, so d(x(a), x(b)) = |a^2 - b^2|: uniform alphas give uneven steps (2k+1)/(K-1)^2.
"""

import numpy as np
import pytest
import torch

from impus_lite.errors import InputError
from impus_lite.schedules import (FrameCache, beta_alphas, distance_curve, fit_distance_power,
                                  fixed_schedule, perceptual_search, reschedule_alphas,
                                  rescheduled_search, search_frame_count, uniform_alphas)


def render(alphas):
    return torch.cat([torch.full((1, 3, 4, 4), float(a) ** 2) for a in alphas])


def distance(x, y):
    return (x - y).abs().mean(dim=(1, 2, 3))


def squared_distance(x, y):
    """(a^2 - b^2)^2 on this path: like LPIPS over small steps, it adds up only as its square root."""
    return ((x - y) ** 2).mean(dim=(1, 2, 3))


def steps_of(alphas):
    """The consecutive distances |a_{k+1}^2 - a_k^2| of frames rendered at ``alphas``."""
    return [float(distance(render([a]), render([b]))) for a, b in zip(alphas[:-1], alphas[1:])]


def test_perceptual_search_makes_even_steps():
    cache = FrameCache(render, batch_size=4)
    s = perceptual_search(cache, distance, step=0.2, tol=0.01)
    d = np.asarray(s.distances)
    assert s.alphas[0] == 0 and s.alphas[-1] == 1 and np.all(np.diff(s.alphas) > 0)
    assert np.all(np.abs(d[:-1] - 0.2) <= 0.01)
    assert d[-1] <= 0.2 + 1e-9
    # Closed form: after k steps of 0.2 the frame sits at a = sqrt(0.2 k); 5 steps reach 1.
    assert len(s.alphas) in (6, 7)
    assert np.allclose(s.alphas[1:5], np.sqrt(0.2 * np.arange(1, 5)), atol=0.03)


def test_batched_candidates_find_the_same_steps_in_fewer_rounds():
    one = perceptual_search(FrameCache(render), distance, 0.2, 0.01, candidates=1)
    three = perceptual_search(FrameCache(render, batch_size=3), distance, 0.2, 0.01, candidates=3)
    assert len(three.alphas) == len(one.alphas)
    assert np.all(np.abs(np.asarray(three.distances[:-1]) - 0.2) <= 0.01)


@pytest.mark.parametrize("frames", [2, 3, 5, 9, 17])
def test_asking_for_n_frames_gives_n_even_frames(frames):
    s = search_frame_count(FrameCache(render), distance, frames)
    assert len(s.alphas) == frames and len(s.frames) == frames
    d = np.asarray(s.distances)
    step = 1.0 / (frames - 1)  # the path's length is 1
    assert np.all(np.abs(d - step) <= step / 4 + 1e-9), d


@pytest.mark.parametrize("frames", [5, 17])
def test_reschedule_evens_out_the_uneven_uniform_path(frames):
    uniform = np.asarray(steps_of(uniform_alphas(frames)))
    s = rescheduled_search(FrameCache(render), distance, frames, passes=3)
    d = np.asarray(s.distances)
    assert len(s.alphas) == frames
    assert d.std() < uniform.std() / 10


def test_damped_reschedule_moves_part_way_from_the_previous_alphas():
    # Two passes: uniform alphas, then (1 - damping) * reschedule(uniform) + damping * uniform.
    frames, damping = 5, 0.3
    uniform = uniform_alphas(frames)
    d = steps_of(uniform)
    full = np.asarray(reschedule_alphas(uniform, d, frames))
    s = rescheduled_search(FrameCache(render), distance, frames, passes=2, rel_tol=0.0, damping=damping)
    assert np.allclose(s.alphas, (1 - damping) * full + damping * np.asarray(uniform))
    assert np.var(s.distances) < np.var(d)


def test_reschedule_returns_its_most_even_pass_and_rejects_bad_damping():
    # With an additive distance (power 1) the curve through every rendered frame is the exact
    # cumulative distance at those alphas, so each pass reschedules the union of all passes.
    s = rescheduled_search(FrameCache(render), distance, 5, passes=4, rel_tol=0.0, damping=0.5, power=1.0)
    passes = [uniform_alphas(5)]
    for _ in range(3):
        seen = sorted(set().union(*passes))
        target = np.asarray(reschedule_alphas(seen, steps_of(seen), 5))
        passes.append(list(0.5 * target + 0.5 * np.asarray(passes[-1])))
    variances = [np.var(steps_of(a)) for a in passes]
    assert np.allclose(s.alphas, passes[int(np.argmin(variances))])
    assert s.renders == 5 + 3 * 3  # endpoints once, three interior frames per later pass
    with pytest.raises(InputError):
        rescheduled_search(FrameCache(render), distance, 5, passes=2, damping=1.0)


def test_fitted_power_makes_finer_distances_add_up():
    # A gap of length h cut into n equal parts: squared distances give D = h^2 and parts
    # (h/n)^2, so sum (1/n^2)^p = 1 at p = 1/2; additive distances at p = 1.
    h, n = 0.4, 4
    assert fit_distance_power([h ** 2], [np.full(n, (h / n) ** 2)]) == pytest.approx(0.5, abs=1e-3)
    assert fit_distance_power([h, 0.3], [np.full(n, h / n), None]) == pytest.approx(1.0, abs=1e-3)
    assert fit_distance_power([h], [None], default=0.7) == 0.7          # nothing finer rendered
    assert fit_distance_power([h], [np.array([h, h])]) == 2.0           # clipped to its bounds


def test_distance_curve_runs_through_every_rendered_frame():
    cache = FrameCache(render)
    coarse = fixed_schedule([0.0, 0.5, 1.0], cache, distance)
    cache.get([0.1, 0.3, 0.7])
    knots, curve, p = distance_curve(coarse, cache, distance)
    assert knots.tolist() == [0.0, 0.1, 0.3, 0.5, 0.7, 1.0]
    assert p == pytest.approx(1.0, abs=1e-3)
    assert np.allclose(curve, knots ** 2, atol=1e-3)  # the exact cumulative distance a^2
    coarse = fixed_schedule([0.0, 0.5, 1.0], cache, squared_distance)
    knots, curve, p = distance_curve(coarse, cache, squared_distance)
    assert p == pytest.approx(0.5, abs=1e-3)          # sqrt of (a^2 - b^2)^2 adds up
    assert np.allclose(curve, knots ** 2, atol=1e-3)


def test_fitted_power_evens_out_a_distance_that_does_not_add_up():
    # Equal steps of a^2 are equal squared distances: alpha_k = sqrt(k / (K-1)).
    frames = 9
    exact = np.sqrt(np.linspace(0, 1, frames))
    fitted = rescheduled_search(FrameCache(render), squared_distance, frames, passes=4, rel_tol=0.0)
    plain = rescheduled_search(FrameCache(render), squared_distance, frames, passes=4, rel_tol=0.0, power=1.0)
    assert np.abs(np.asarray(fitted.alphas) - exact).max() < 0.01
    assert np.var(fitted.distances) < np.var(plain.distances) / 10
    assert any("exponent" in n for n in fitted.notes)


def test_reschedule_frame_count_follows_from_the_step():
    s = rescheduled_search(FrameCache(render), distance, None, passes=2, step=0.2)
    assert len(s.alphas) == 6  # ceil(1 / 0.2) + 1


def test_reschedule_alphas_inverts_the_cumulative_curve():
    # Distances 0.1, 0.3 on alphas 0, 0.5, 1: halfway along the path (0.2) is at alpha 0.5 + 0.5/3.
    alphas = reschedule_alphas([0.0, 0.5, 1.0], [0.1, 0.3], 3)
    assert alphas == pytest.approx([0.0, 0.5 + 0.5 / 3, 1.0])


def test_beta_prior_alphas():
    assert beta_alphas(5, 1, 1) == pytest.approx(uniform_alphas(5))
    a = np.asarray(beta_alphas(9, 3, 3))
    assert np.allclose(a, 1 - a[::-1])                  # symmetric prior, symmetric alphas
    assert np.diff(a)[4] < np.diff(uniform_alphas(9))[4]  # crowded in the middle


def test_cache_renders_each_alpha_once():
    calls = []
    cache = FrameCache(lambda a: calls.append(list(a)) or render(a), batch_size=2)
    cache.get([0.0, 0.5, 1.0])
    cache.get([0.5, 1.0, 0.25])
    assert sorted(sum(calls, [])) == [0.0, 0.25, 0.5, 1.0]
    assert max(len(c) for c in calls) <= 2 and cache.renders == 4


@pytest.mark.parametrize("call", [lambda: uniform_alphas(1), lambda: beta_alphas(0),
                                  lambda: search_frame_count(FrameCache(render), distance, 1)])
def test_fewer_than_two_frames_is_refused(call):
    with pytest.raises(InputError, match="at least 2 frames"):
        call()


def test_max_frames_stops_a_search_that_cannot_finish():
    with pytest.warns(UserWarning, match="max_frames"):
        s = perceptual_search(FrameCache(render), distance, 0.01, tol=0.001, max_frames=5)
    assert len(s.alphas) == 5 and s.alphas[-1] == 1.0
    assert s.notes and "max_frames" in s.notes[0]


def test_a_search_that_reaches_the_end_on_its_last_allowed_frame_says_nothing(recwarn):
    # step 0.3 on d = |a^2 - b^2|: alphas 0, sqrt(0.3), sqrt(0.6), sqrt(0.9), then 1 (last step 0.1)
    s = perceptual_search(FrameCache(render), distance, 0.3, tol=0.001, max_frames=5)
    assert len(s.alphas) == 5 and s.distances[-1] < 0.3
    assert not s.notes and not [w for w in recwarn if "max_frames" in str(w.message)]
