"""Checks for the exercises on text embeddings, guidance and DDIM codes (notebooks 03 and 04).

Each check runs the student's function on fixed, seeded inputs and compares the result with
the package's own implementation (:mod:`impus_lite.interp`, diffusers' ``DDIMInverseScheduler``
as :mod:`impus_lite.inversion` uses it) or with a closed form. Inputs are small tensors: every
check runs in well under a second on a CPU and needs no model.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ..interp import lerp, slerp
from .base import CheckResult, compare

__all__ = ["check_guidance", "check_inversion_step", "check_lerp_norm", "check_shell_barycenter",
           "check_slerp", "check_slerp_alpha"]


def _row_pairs(d: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Five (x0, x1) row pairs, float32 (5, d): three independent Gaussian pairs (one with
    x1 twice as long), one nearly parallel (cos > 1 - 1e-6) and one identical."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(5, d, generator=g)
    x1 = torch.randn(5, d, generator=g)
    x1[1] *= 2.0
    x1[3] = x0[3] + 1e-3 * torch.randn(d, generator=g)
    x1[4] = x0[4]
    return x0, x1


def check_slerp(fn: Callable, alphas=(0.0, 0.25, 0.5, 1.0)) -> CheckResult:
    """``fn(x0, x1, alpha)``: slerp of each row pair of two (B, d) tensors at one float alpha.

    ``slerp(x0, x1, a) = sin((1-a) theta)/sin(theta) x0 + sin(a theta)/sin(theta) x1`` with
    ``cos theta = <x0, x1> / (|x0| |x1|)``, row by row; returns (B, d). Compared with
    :func:`impus_lite.interp.slerp` applied row by row, on five float32 row pairs with d = 64
    (independent, unequal norms, nearly parallel, identical) at alpha = 0, 0.25, 0.5 and 1.
    Error: the largest difference divided by sqrt(d) (entries are of order 1).
    """
    x0, x1 = _row_pairs()
    expected = torch.stack([torch.stack([slerp(a, b, float(alpha)) for a, b in zip(x0, x1)])
                            for alpha in alphas])
    return compare(
        f"slerp of {len(x0)} row pairs at alphas {list(alphas)}",
        lambda: torch.stack([torch.as_tensor(fn(x0.clone(), x1.clone(), float(alpha))) for alpha in alphas]),
        expected, 1e-5, relative_to=math.sqrt(x0.shape[1]),
        hint="midpoints shorter than the ends mean a straight line (lerp): the weights are "
             "sin((1-a) theta)/sin(theta) and sin(a theta)/sin(theta), per row (sum over dim=1, "
             "keepdim); NaN or inf means identical rows: clamp cos to [-1, 1] and use lerp when "
             "cos theta > 0.9995")


def check_shell_barycenter(fn: Callable, alphas=(0.0, 0.25, 0.5, 0.9, 1.0)) -> CheckResult:
    """``fn(z0, z1, alpha)``: the barycenter of each row pair on the shell |z| = r.

    For rows with ``|z0| = |z1| = r``:
    ``argmin_{|z| = r} (1-a)|z - z0|^2 + a|z - z1|^2 = r lerp(z0, z1, a) / |lerp(z0, z1, a)|``,
    row by row; z0, z1 are (B, d), alpha a float, the result (B, d). Checked against that
    closed form (with :func:`impus_lite.interp.lerp`) on four row pairs with d = 64, each pair
    on its own shell (r from 1 to 8), at alpha = 0, 0.25, 0.5, 0.9 and 1.
    Error: the largest difference divided by the largest r.
    """
    g = torch.Generator().manual_seed(1)
    z0, z1 = torch.randn(4, 64, generator=g), torch.randn(4, 64, generator=g)
    r = torch.tensor([1.0, 2.0, 8.0, 5.0])[:, None]
    z0, z1 = r * z0 / z0.norm(dim=1, keepdim=True), r * z1 / z1.norm(dim=1, keepdim=True)

    def closed_form(alpha):
        line = lerp(z0, z1, alpha)
        return r * line / line.norm(dim=1, keepdim=True)

    expected = torch.stack([closed_form(float(a)) for a in alphas])
    return compare(
        f"barycenter on the shell for {len(z0)} row pairs at alphas {list(alphas)}",
        lambda: torch.stack([torch.as_tensor(fn(z0.clone(), z1.clone(), float(a))) for a in alphas]),
        expected, 1e-5, relative_to=float(r.max()),
        hint="the answer lies on the shell: rescale lerp(z0, z1, alpha) to length r = |z0| of its own "
             "row (not to 1, and not the whole batch at once: norm(dim=1, keepdim=True))")


def check_slerp_alpha(fn: Callable) -> CheckResult:
    """``fn(alpha, theta)``: the alpha' at which slerp reaches the shell barycenter at alpha.

    For two vectors of one norm at angle theta (radians, in (0, pi)), the barycenter on the
    shell points along lerp(z0, z1, alpha), at the angle
    ``phi = atan2(alpha sin(theta), (1 - alpha) + alpha cos(theta))`` from z0; slerp at alpha'
    has turned alpha' theta, so ``alpha' = phi / theta``. Checked at alpha in {0.1, 0.25, 0.5,
    0.75} and theta in {30, 90, 120} degrees (floats in, a float out), against the angle of
    :func:`impus_lite.interp.lerp` between two unit vectors of the plane.
    """
    alphas, thetas = (0.1, 0.25, 0.5, 0.75), (math.pi / 6, math.pi / 2, 2 * math.pi / 3)

    def expected_alpha(alpha, theta):
        z0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
        z1 = torch.tensor([math.cos(theta), math.sin(theta)], dtype=torch.float64)
        line = lerp(z0, z1, alpha)
        return math.atan2(float(line[1]), float(line[0])) / theta

    expected = [[expected_alpha(a, t) for a in alphas] for t in thetas]
    return compare(
        "alpha' at which slerp meets the shell barycenter, 4 alphas x 3 angles",
        lambda: [[float(fn(a, t)) for a in alphas] for t in thetas], expected, 1e-6,
        hint="the barycenter points along lerp: its angle from z0 is atan2(alpha sin theta, "
             "(1 - alpha) + alpha cos theta); slerp at alpha' has turned alpha' theta (at theta = "
             "90 degrees and alpha = 0.25 the answer is about 0.205)")


def check_lerp_norm(fn: Callable) -> CheckResult:
    """``fn(alpha)``: |lerp(x0, x1, alpha)| / sqrt(d) for independent x0, x1 ~ N(0, I_d), d large.

    ``|(1-a) x0 + a x1|^2 = (1-a)^2 |x0|^2 + a^2 |x1|^2 + 2 a (1-a) <x0, x1>
    ~ d ((1-a)^2 + a^2)``, as ``|x|^2 ~ d`` and ``<x0, x1> ~ 0`` (within sqrt(d)); so the answer
    is ``sqrt((1-a)^2 + a^2)``, 1/sqrt(2) at the midpoint. Checked at 11 alphas in [0, 1]
    (a float in, a float out) against that closed form.
    """
    alphas = np.linspace(0.0, 1.0, 11)
    return compare(
        "|lerp(x0, x1, alpha)| / sqrt(d) at 11 alphas",
        lambda: [float(fn(float(a))) for a in alphas], np.sqrt((1 - alphas) ** 2 + alphas ** 2), 1e-6,
        hint="x0 and x1 are nearly orthogonal, so the squared norms add (Pythagoras), with weights "
             "(1-alpha)^2 and alpha^2, each |x|^2 being about d; the lengths do not add linearly")


def check_inversion_step(fn: Callable, schedule=None, steps: int = 10) -> CheckResult:
    """``fn(x_s, eps, a_s, a_t)``: one DDIM inversion step, from noise level s up to level t > s.

    ``x0_hat = (x_s - sqrt(1 - a_s) eps) / sqrt(a_s)``, ``x_t = sqrt(a_t) x0_hat + sqrt(1 - a_t) eps``
    with ``a_s``, ``a_t`` the 0-dim tensors abar_s, abar_t and x_s, eps (B, 4, h, w); returns x_t.
    Compared with diffusers' ``DDIMInverseScheduler.step`` (what
    :func:`impus_lite.inversion.ddim_invert` runs) on random (2, 4, 8, 8) latents and noise, at
    every level of a ``steps``-step grid (the first step starts below level 0, where the
    scheduler's ``initial_alpha_cumprod`` stands in for abar_s). ``schedule``: the training noise
    schedule, as a scheduler or its configuration (e.g. ``model.scheduler_config``; default:
    Stable Diffusion's, which the classroom model shares). Error: the largest difference
    divided by the largest |x_t|.
    """
    from diffusers import DDIMInverseScheduler
    from diffusers.utils import logging as diffusers_logging

    from ..models import SD_SCHEDULER_CONFIG

    config = SD_SCHEDULER_CONFIG if schedule is None else getattr(schedule, "config", schedule)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # a DDIMScheduler's config has keys the inverse one ignores
    try:
        inverse = DDIMInverseScheduler.from_config(dict(config))
    finally:
        diffusers_logging.set_verbosity(verbosity)
    inverse.set_timesteps(steps)
    abar, jump = inverse.alphas_cumprod, inverse.config.num_train_timesteps // inverse.num_inference_steps
    g = torch.Generator().manual_seed(2)
    cases = []
    for t in inverse.timesteps:
        s = int(t) - jump
        a_s = abar[s] if s >= 0 else inverse.initial_alpha_cumprod
        x_s, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        cases.append((x_s, eps, a_s.clone(), abar[int(t)].clone(), inverse.step(eps, t, x_s).prev_sample))
    expected = torch.stack([case[-1] for case in cases])
    return compare(
        f"DDIM inversion step at the {len(cases)} levels of a {steps}-step grid",
        lambda: torch.stack([torch.as_tensor(fn(x.clone(), e.clone(), a, b)) for x, e, a, b, _ in cases]),
        expected, 1e-5, relative_to=float(expected.abs().max()),
        hint="x0_hat divides by sqrt(a_s), the level the latent is at, and the step re-noises x0_hat "
             "to level t with sqrt(a_t) and sqrt(1 - a_t), using the same eps")


def check_guidance(fn: Callable) -> CheckResult:
    """``fn(eps_uncond, eps_cond, w)``: classifier-free guidance, ``eps_u + w (eps_c - eps_u)``.

    eps_uncond, eps_cond: (B, 4, h, w); w: a float, or a (B,) tensor with one scale per latent
    (IMPUS gives every frame its own w). Returns (B, 4, h, w). Checked on random (3, 4, 8, 8)
    predictions at w = 0 (the unconditional branch), 1 (the conditional one), 7.5 and the
    per-latent w = (1.5, 3, 1.5), against the closed form (the sum
    :func:`impus_lite.inversion.guidance_noise` returns).
    """
    g = torch.Generator().manual_seed(3)
    eps_u, eps_c = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    scales = [0.0, 1.0, 7.5, torch.tensor([1.5, 3.0, 1.5])]

    def closed_form(w):
        w = torch.as_tensor(w, dtype=torch.float32).reshape(-1, 1, 1, 1)
        return eps_u + w * (eps_c - eps_u)

    def run(w):
        try:
            return torch.as_tensor(fn(eps_u.clone(), eps_c.clone(), w))
        except NotImplementedError:  # a RuntimeError too: the stub, "not written"
            raise
        except RuntimeError as error:  # most often a (B,) w that does not broadcast over (B, 4, h, w)
            raise RuntimeError(f"{error} (at w = {w}: a (B,) w needs w.view(-1, 1, 1, 1))") from error

    return compare(
        "guided noise at w = 0, 1, 7.5 and a per-latent w",
        lambda: torch.stack([run(w) for w in scales]),
        torch.stack([closed_form(w) for w in scales]), 1e-5,
        hint="w = 0 must give eps_uncond and w = 1 eps_cond (are the branches swapped?); a (B,) w "
             "needs w.view(-1, 1, 1, 1) to scale each latent (torch.as_tensor turns a float into a tensor)")
