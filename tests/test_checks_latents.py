"""The checks of notebooks 03 and 04: the package's answer is right, a plausible mistake is
wrong, a stub is "not written", and none of them raises unless checks are strict."""

import math

import pytest
import torch

from impus_lite import checks

from conftest import assert_check_contract
from impus_lite.interp import lerp, slerp


def stub(*args):
    raise NotImplementedError("write it")


def rowwise_slerp(x0, x1, alpha):
    return torch.stack([slerp(a, b, alpha) for a, b in zip(x0, x1)])


def shell_barycenter(z0, z1, alpha):
    line = lerp(z0, z1, alpha)
    return z0.norm(dim=1, keepdim=True) * line / line.norm(dim=1, keepdim=True)


def naive_slerp(x0, x1, alpha):  # the textbook formula without the guard: NaN on identical rows
    cos = (x0 * x1).sum(1, keepdim=True) / (x0.norm(dim=1, keepdim=True) * x1.norm(dim=1, keepdim=True))
    theta = torch.arccos(cos)
    return (torch.sin((1 - alpha) * theta) * x0 + torch.sin(alpha * theta) * x1) / torch.sin(theta)


def inversion_step(x_s, eps, a_s, a_t):
    x0_hat = (x_s - (1 - a_s).sqrt() * eps) / a_s.sqrt()
    return a_t.sqrt() * x0_hat + (1 - a_t).sqrt() * eps


CASES = {
    "slerp": (checks.check_slerp, rowwise_slerp, lambda x0, x1, a: lerp(x0, x1, a)),
    "slerp without a guard": (checks.check_slerp, rowwise_slerp, naive_slerp),
    "shell barycenter": (checks.check_shell_barycenter, shell_barycenter,
                         lambda z0, z1, a: lerp(z0, z1, a) / lerp(z0, z1, a).norm(dim=1, keepdim=True)),
    "slerp alpha": (checks.check_slerp_alpha,
                    lambda a, t: math.atan2(a * math.sin(t), 1 - a + a * math.cos(t)) / t,
                    lambda a, t: a),
    "lerp norm": (checks.check_lerp_norm, lambda a: math.sqrt((1 - a) ** 2 + a ** 2), lambda a: 1 - a * (1 - a)),
    "inversion step": (checks.check_inversion_step, inversion_step,
                       lambda x_s, eps, a_s, a_t: (a_t.sqrt() * (x_s - (1 - a_t).sqrt() * eps) / a_s.sqrt()
                                                   + (1 - a_t).sqrt() * eps)),
    "guidance": (checks.check_guidance,
                 lambda u, c, w: u + torch.as_tensor(w).reshape(-1, 1, 1, 1) * (c - u),
                 lambda u, c, w: c + torch.as_tensor(w).reshape(-1, 1, 1, 1) * (u - c)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_right_wrong_and_stub_without_raising(name, monkeypatch, capsys):
    assert_check_contract(*CASES[name], monkeypatch, capsys)


def test_a_guidance_that_does_not_broadcast_says_how_to(monkeypatch):
    monkeypatch.delenv(checks.STRICT_ENV, raising=False)
    result = checks.check_guidance(lambda u, c, w: u + w * (c - u))
    assert result.status == "wrong" and "view(-1, 1, 1, 1)" in result.hint


def test_the_inversion_check_follows_a_given_scheduler(monkeypatch):
    from diffusers import DDIMInverseScheduler

    from impus_lite.models import SD_SCHEDULER_CONFIG

    monkeypatch.delenv(checks.STRICT_ENV, raising=False)
    linear = DDIMInverseScheduler.from_config({**SD_SCHEDULER_CONFIG, "beta_schedule": "linear",
                                               "beta_start": 0.0001, "beta_end": 0.02})
    assert checks.check_inversion_step(inversion_step, linear, steps=7)
    assert checks.check_inversion_step(inversion_step, dict(linear.config), steps=7)
