"""The checks of notebook 06: the package's answer passes, a plausible mistake fails, a stub is
"not written", and none of them raises unless strict mode is on."""

import numpy as np
import pytest

from impus_lite import checks, perceptual, schedules
from impus_lite.checks import schedules as schedule_checks


@pytest.fixture(autouse=True)
def lenient(monkeypatch):
    monkeypatch.delenv(checks.STRICT_ENV, raising=False)


def stub(*args):
    raise NotImplementedError("write it")


def binary_search(render, distance, current, step, tol, exact=False):
    x_current = render([current])
    lo, hi = current, 1.0
    while True:
        mid = (lo + hi) / 2
        d = float(distance(x_current, render([mid]))[0])
        if (not exact and abs(d - step) <= tol) or hi - lo < 1e-8:
            return mid
        if d > step:
            hi = mid
        else:
            lo = mid


def binary_search_from_start(render, distance, current, step, tol):
    """The usual mistake: measuring from the first frame instead of the current one."""
    x_start = render([0.0])
    lo, hi = current, 1.0
    while True:
        mid = (lo + hi) / 2
        d = float(distance(x_start, render([mid]))[0])
        if abs(d - step) <= tol or hi - lo < 1e-8:
            return mid
        lo, hi = (lo, mid) if d > step else (mid, hi)


def reschedule(alphas, distances, frames):
    curve = np.concatenate([[0.0], np.cumsum(distances)])
    return np.interp(np.linspace(0.0, curve[-1], frames), curve, alphas)


def reschedule_swapped(alphas, distances, frames):
    curve = np.concatenate([[0.0], np.cumsum(distances)])
    return np.interp(np.linspace(0.0, 1.0, frames), alphas, curve / curve[-1])


def gini(d):
    d = np.asarray(d, dtype=float)
    return np.abs(d[:, None] - d[None, :]).sum() / (2 * d.size ** 2 * d.mean())


def gini_pairs(d):
    d = np.asarray(d, dtype=float)
    return np.abs(d[:, None] - d[None, :]).sum() / (2 * d.size * (d.size - 1) * d.mean())


def toy_uniform_pdv(K):
    n = K - 1
    return (n ** 2 - 1) / (3 * n ** 4)


CASES = [
    (checks.check_binary_search, binary_search, binary_search_from_start),
    (checks.check_binary_search, binary_search, lambda *a: binary_search(*a, exact=True)),
    (checks.check_reschedule, reschedule, reschedule_swapped),
    (checks.check_reschedule, schedules.reschedule_alphas, lambda a, d, n: np.linspace(0, 1, n)),
    (checks.check_pdv, perceptual.pdv, lambda d: np.var(d, ddof=1)),
    (checks.check_pdv, np.var, np.std),
    (checks.check_gini, perceptual.gini, gini_pairs),
    (checks.check_gini, gini, lambda d: 1 - perceptual.gini(d)),
    (checks.check_toy_uniform_pdv, toy_uniform_pdv, lambda K: (K ** 2 - 1) / (3 * K ** 4)),
]


@pytest.mark.parametrize("check, right, wrong", CASES, ids=[f"{c.__name__}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_right_passes_wrong_fails_stub_is_not_written(check, right, wrong, capsys):
    assert check(right).status == "right"
    assert check(wrong).status == "wrong"
    assert check(stub).status == "not written"
    out = capsys.readouterr().out
    assert "✓ right" in out and "✗ wrong" in out and "not written" in out


def test_strict_mode_raises_on_wrong_and_stub(monkeypatch):
    monkeypatch.setenv(checks.STRICT_ENV, "1")
    assert checks.check_pdv(perceptual.pdv)
    with pytest.raises(checks.CheckFailed):
        checks.check_pdv(np.std)
    with pytest.raises(checks.CheckFailed):
        checks.check_binary_search(stub)


def test_the_toy_path_is_notebook_06s():
    frames = schedule_checks.toy_render([0.0, 0.5, 1.0])
    assert frames.shape == (3, 3, 8, 8)
    d = schedule_checks.toy_distance(frames[:-1], frames[1:])
    assert np.allclose(d.numpy(), [0.25, 0.75])
