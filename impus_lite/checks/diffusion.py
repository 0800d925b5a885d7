"""Checks for the diffusion exercises (notebook 02).

    checks.check_ddim_step(fn)   # one deterministic DDIM step (eta = 0), against diffusers

The schedule is the toy model's, :data:`impus_lite.toy_diffusion.SCHEDULE_CONFIG` (1000 linear
betas from 1e-4 to 0.02, ``abar_t`` = diffusers' ``alphas_cumprod[t]``), with the DDIM settings
the toy's decoder uses (trailing timesteps, ``abar = 1`` beyond t = 0).
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from ..toy_diffusion import _DDIM_EXTRA, SCHEDULE_CONFIG
from .base import CheckResult, compare, largest_difference

__all__ = ["check_ddim_step"]


def _reference_steps(num_steps: int = 10, n: int = 64):
    """Fixed inputs and diffusers' answers: a list of (x_t, eps_hat, abar_t, abar_prev, x_prev)."""
    scheduler = DDIMScheduler(**{**SCHEDULE_CONFIG, **_DDIM_EXTRA})
    scheduler.set_timesteps(num_steps)
    generator = torch.Generator().manual_seed(0)
    cases = []
    for t in scheduler.timesteps[1:]:  # t = 899 ... 99 (t = 999 divides by sqrt(abar) = 0.006)
        t = int(t)
        prev = t - scheduler.config.num_train_timesteps // num_steps
        abar_t = scheduler.alphas_cumprod[t].double()
        abar_prev = (scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod).double()
        x_t = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        eps = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        expected = scheduler.step(eps, t, x_t, eta=0.0).prev_sample
        cases.append((x_t, eps, abar_t, abar_prev, expected))
    return cases


def check_ddim_step(fn) -> CheckResult:
    """``fn(x_t, eps_hat, abar_t, abar_prev)``: one deterministic DDIM step from level t to t - 1.

    ``x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)`` and
    ``x_{t-1} = sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1}) eps_hat``. Expected: diffusers'
    ``DDIMScheduler.step(eps_hat, t, x_t, eta=0)`` with the toy model's schedule, 10 steps
    (timesteps 899, 799, ..., 99; the last one steps to abar = 1, the clean end).
    Inputs: ``x_t``, ``eps_hat`` float64 tensors (64, 2) (seeded); ``abar_t``, ``abar_prev``
    0-d float64 tensors. Error: the largest difference relative to the largest expected
    value; tolerance 1e-6.
    """
    cases = _reference_steps()
    expected = torch.stack([case[-1] for case in cases])
    scale = float(expected.abs().max())

    def compute():
        return torch.stack([torch.as_tensor(fn(x.clone(), e.clone(), a, p), dtype=torch.float64)
                            for x, e, a, p, _ in cases])

    hint = ("x0_hat divides by sqrt(abar_t), the level you come from; the re-noising uses "
            "abar_prev, the level you go to; every abar enters under a square root")
    try:
        got = compute()
        swapped = torch.stack([p.sqrt() * (x - (1 - a).sqrt() * e) / a.sqrt() + (1 - p).sqrt() * e
                               for x, e, p, a, _ in cases])  # abar_t and abar_prev exchanged
        if largest_difference(got, swapped) < 1e-6 * scale:
            hint = "abar_t and abar_prev are exchanged: that is a step of the encoder (inversion), not of the sampler"
    except Exception:
        pass
    return compare("DDIM step (eta = 0) at 9 timesteps", compute, expected, 1e-6, hint, relative_to=scale)
