"""Checks for notebook 05 (the LoRA bottleneck): rPPD, the rank rule, one LoRA forward pass,
and rPPD of a straight path under a quadratic distance.

Each check runs the student's function on fixed inputs and compares it with the package's own
implementation (:func:`impus_lite.perceptual.rppd`, :func:`impus_lite.lora.rank_from_rppd`,
a real peft ``LoraLayer``) or with a closed form.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from .base import CheckResult, compare

__all__ = ["check_rppd", "check_rank_rule", "check_lora_forward"]


def _rppd_cases() -> list[tuple[np.ndarray, float]]:
    """Fixed paths: (consecutive distances (K-1,), end distance) for K = 10, 6 and 2 frames."""
    rng = np.random.default_rng(5)
    return [(rng.uniform(0.0, 0.3, size=9), 0.46), (rng.uniform(0.0, 0.2, size=5), 0.31),
            (np.array([0.25]), 0.25)]


def check_rppd(fn: Callable[[np.ndarray, float], float]) -> CheckResult:
    """``fn(steps, end_distance)`` against :func:`impus_lite.perceptual.rppd`.

    rPPD (IMPUS's equation) of K frames: the mean consecutive distance over the end distance,
    ``sum_k d_k / ((K-1) LPIPS(x_0, x_{K-1}))``, where ``steps`` is the array (K-1,) of the
    d_k and ``end_distance`` a positive float. Checked on three fixed paths (K = 10, 6, 2);
    the error is the largest absolute difference of the three values.
    """
    from ..perceptual import rppd

    cases = _rppd_cases()
    expected = [rppd(steps, end) for steps, end in cases]
    return compare("rPPD of 3 paths (K = 10, 6, 2 frames)",
                   lambda: [float(fn(steps.copy(), end)) for steps, end in cases], expected, 1e-9,
                   "divide the sum of the K-1 steps by (K-1) times the end distance: len(steps) is "
                   "K-1 already (the number of frames minus one)")


def _rank_grid() -> list[tuple[float, bool]]:
    """rPPD values on both sides of every threshold k/18 (k = 6..14), plus 0, 0.2 and 1.0,
    each for an ordinary and an outlier pair."""
    values = [0.0, 0.2, 1.0]
    for k in range(6, 15):
        values += [k / 18 - 1e-6, k / 18 + 1e-6]
    return [(v, outlier) for v in values for outlier in (False, True)]


def check_rank_rule(fn: Callable[[float, bool], int]) -> CheckResult:
    """``fn(rppd, outlier)`` against :func:`impus_lite.lora.rank_from_rppd`.

    IMPUS's rule ``r = 2 ** max(0, floor(18 rPPD - 6))``, and ``max(r, 16)`` when ``outlier``
    is True. Checked on a grid of rPPD in [0, 1] that straddles each threshold k/18
    (k = 6..14, at +-1e-6), for ordinary and outlier pairs; the error is the largest absolute
    difference of the ranks (integers: right means equal everywhere).
    """
    from ..lora import rank_from_rppd

    grid = _rank_grid()
    expected = [rank_from_rppd(v, o) for v, o in grid]
    return compare(f"the rank rule at {len(grid)} (rPPD, outlier) points",
                   lambda: [float(fn(v, o)) for v, o in grid], expected, 0.0,
                   "r = 2 ** max(0, floor(18 * rppd - 6)): below rPPD = 7/18 the rank is 1 (the "
                   "max(0, ...)), and an outlier pair gets max(r, 16), not 16 whatever r is")


def _lora_layer(in_features: int = 12, out_features: int = 8, rank: int = 4, alpha: int = 8):
    """A peft LoRA layer on a bias-free nn.Linear, seeded, with B drawn non-zero."""
    from peft import LoraConfig, inject_adapter_in_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        holder = torch.nn.Module()
        holder.proj = torch.nn.Linear(in_features, out_features, bias=False)
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj"], init_lora_weights="gaussian")
        holder = inject_adapter_in_model(config, holder)
        layer = holder.proj
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_(0, 0.5)  # peft starts B at 0: the check needs B != 0
        x = torch.randn(5, in_features)
    return layer, x


def check_lora_forward(fn: Callable[..., Any]) -> CheckResult:
    """``fn(x, W, A, B, alpha, r)`` against a real peft ``LoraLayer`` wrapping an ``nn.Linear``.

    One LoRA-adapted linear layer: ``y = x W^T + (alpha / r) (x A^T) B^T`` with x (N, in),
    W (out, in), A (r, in), B (out, r); here N = 5, in = 12, out = 8, r = 4, alpha = 8 (scale 2),
    B drawn non-zero (peft starts it at 0). The expected y (5, 8) is the peft layer's output on
    the same x; the error is the largest absolute difference.
    """
    layer, x = _lora_layer()
    W = layer.base_layer.weight.detach().clone()
    A = layer.lora_A["default"].weight.detach().clone()
    B = layer.lora_B["default"].weight.detach().clone()
    alpha, r = layer.lora_alpha["default"], layer.r["default"]
    with torch.no_grad():
        expected = layer(x)
    return compare("LoRA forward of a (5, 12) batch through a (12 -> 8, r = 4) layer",
                   lambda: fn(x.clone(), W, A, B, alpha, r), expected, 1e-5,
                   "y = x @ W.T + (alpha / r) * (x @ A.T) @ B.T: A is (r, in) and B is (out, r); the "
                   "usual slips are a missing alpha / r scale or a transpose")
