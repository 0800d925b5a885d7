"""The checks of notebooks 00, 01 and 02: the package's answer is right, a plausible mistake is
wrong, a stub is "not written", and none of them raises unless checks are strict."""

import numpy as np
import pytest
import torch

from impus_lite import checks

from conftest import assert_check_contract
from impus_lite import ot as iot
from impus_lite.interp import lerp


def stub(*args):
    raise NotImplementedError("write it")


def ddim_step(x_t, eps, abar_t, abar_prev):
    x0_hat = (x_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
    return abar_prev.sqrt() * x0_hat + (1 - abar_prev).sqrt() * eps


def quantile_barycenter(h0, h1, alpha, x):
    """Cell-uniform quantile functions at 4000 levels, averaged, binned back onto the cells."""
    edges = np.r_[x[0] - (x[1] - x[0]) / 2, (x[1:] + x[:-1]) / 2, x[-1] + (x[-1] - x[-2]) / 2]
    u = (np.arange(4000) + 0.5) / 4000
    q0 = np.interp(u, np.r_[0, np.cumsum(h0) / h0.sum()], edges)
    q1 = np.interp(u, np.r_[0, np.cumsum(h1) / h1.sum()], edges)
    return np.histogram((1 - alpha) * q0 + alpha * q1, bins=edges)[0] / len(u)


CASES = {
    "dirac barycenter cost": (checks.check_dirac_barycenter_cost,
                              lambda x0, x1, a: a * (1 - a) * np.sum((x0 - x1) ** 2),
                              lambda x0, x1, a: a * (1 - a) * np.linalg.norm(x0 - x1)),
    "dirac barycenter": (checks.check_dirac_barycenter,
                         lambda x0, x1, a: lerp(x0, x1, a),
                         lambda x0, x1, a: a * x0 + (1 - a) * x1),
    "quantile barycenter": (checks.check_quantile_barycenter,
                            quantile_barycenter,
                            lambda h0, h1, a, x: iot.linear_mixture(h0, h1, a)),
    "quantile barycenter, swapped": (checks.check_quantile_barycenter,
                                     lambda h0, h1, a, x: iot.displacement_interpolation_1d(h0, h1, a, x),
                                     lambda h0, h1, a, x: quantile_barycenter(h0, h1, 1 - a, x)),
    "ddim step": (checks.check_ddim_step, ddim_step,
                  lambda x_t, eps, a_t, a_prev: ddim_step(x_t, eps, a_prev, a_t)),
    "ddim step, no square roots": (checks.check_ddim_step, ddim_step,
                                   lambda x_t, eps, a_t, a_prev: a_prev * (x_t - (1 - a_t) * eps) / a_t
                                   + (1 - a_prev) * eps),
}


@pytest.mark.parametrize("name", list(CASES))
def test_right_wrong_and_stub_without_raising(name, monkeypatch, capsys):
    assert_check_contract(*CASES[name], monkeypatch, capsys)


def test_the_gaussian_derivation(monkeypatch, capsys):
    monkeypatch.delenv(checks.STRICT_ENV, raising=False)
    assert checks.check_gaussian_barycenter((1.2, 0.775)).status == "right"
    variances = checks.check_gaussian_barycenter((1.2, (0.7 + 0.3 * 0.25 ** 2) ** 0.5))
    assert variances.status == "wrong" and "variances" in variances.hint
    assert "SECOND" in checks.check_gaussian_barycenter((2.8, 0.475)).hint
    assert checks.check_gaussian_barycenter(...).status == "not written"
    monkeypatch.setenv(checks.STRICT_ENV, "1")
    with pytest.raises(checks.CheckFailed, match="not written"):
        checks.check_gaussian_barycenter(...)


def test_the_gaussian_closed_form_is_what_the_package_measures():
    grid = np.linspace(-6, 8, 400)
    bary = iot.displacement_interpolation_1d(iot.gaussian_histogram(grid, 0.0, 1.0),
                                             iot.gaussian_histogram(grid, 4.0, 0.25), 0.3, grid)
    assert iot.histogram_mean_std(bary, grid) == pytest.approx((1.2, 0.775), abs=1e-3)


def test_hints_name_the_likeliest_mistake(monkeypatch):
    monkeypatch.delenv(checks.STRICT_ENV, raising=False)
    assert "swapped" in checks.check_dirac_barycenter(lambda x0, x1, a: lerp(x0, x1, 1 - a)).hint
    assert "mixture" in CASES["quantile barycenter"][0](CASES["quantile barycenter"][2]).hint
    assert "swapped" in checks.check_quantile_barycenter(CASES["quantile barycenter, swapped"][2]).hint
    assert "exchanged" in checks.check_ddim_step(CASES["ddim step"][2]).hint
    assert "squared" in checks.check_dirac_barycenter_cost(CASES["dirac barycenter cost"][2]).hint


def test_a_crash_or_a_wrong_shape_is_wrong_not_an_exception(monkeypatch):
    monkeypatch.delenv(checks.STRICT_ENV, raising=False)
    assert checks.check_quantile_barycenter(lambda h0, h1, a, x: 1 / 0).status == "wrong"
    assert checks.check_quantile_barycenter(lambda h0, h1, a, x: h0[:5]).status == "wrong"
    assert checks.check_quantile_barycenter(lambda h0, h1, a, x: 2 * h0).status == "wrong"
    assert checks.check_dirac_barycenter(lambda x0, x1, a: x0[0]).status == "wrong"
    assert checks.check_ddim_step(lambda x_t, eps, a_t, a_prev: x_t[:3]).status == "wrong"


def test_the_ddim_reference_is_the_toy_decoders_scheduler():
    from diffusers import DDIMScheduler

    from impus_lite.checks.diffusion import _reference_steps
    from impus_lite.toy_diffusion import _DDIM_EXTRA, SCHEDULE_CONFIG

    scheduler = DDIMScheduler(**{**SCHEDULE_CONFIG, **_DDIM_EXTRA})
    for x_t, eps, abar_t, abar_prev, expected in _reference_steps():
        assert torch.allclose(ddim_step(x_t, eps, abar_t, abar_prev), expected, rtol=1e-6, atol=1e-6)
    assert float(scheduler.final_alpha_cumprod) == 1.0  # the last step lands on the clean end
