"""IMPUS's perceptual path length, StyleGAN form (Yang et al., ICLR 2024, arXiv 2311.06792).

Convention, as in the reference code's metrics_benchmark.py (github.com/GoL2022/IMPUS, itself
adapted from StyleGAN's and torch-fidelity's PPL):

* **equation**: ``PPL = E_a[ LPIPS(x(a), x(a + eps)) / eps^2 ]`` with **eps = 1e-4**, alphas
  drawn uniformly; the expectation is a **trimmed mean**: values below the 1st or above the
  99th percentile are discarded before averaging. A squared speed along the path, not a length:
  it does not depend on a frame count.
* **frames**: none are given; the path is rendered twice per sample (at a and a + eps), so this
  convention needs ``render``: 2 x ``samples`` frames (50 samples in the reference code).
* **distance**: ``lpips.LPIPS(net="alex")`` on the VAE decoder's output, i.e. inputs in about
  [-1, 1] (not clamped); here this package's LPIPS, AlexNet, [-1, 1].

Differences from the reference, all small: alphas are drawn from U[0, 1 - eps] (the reference
draws U[0, 1) and may step past alpha = 1 by eps); numpy's linear percentile interpolation is
used (the reference takes the "lower" and "higher" order statistics); the reference also
reports the standard deviation of the kept values, which is not returned here. The reference
script does not run as published (its morpher class defines ``_init_`` instead of ``__init__``,
and it applies ``float()`` to the whole array of distances), so the paper's definition and the
script's evident intent are followed.
The computation is :func:`impus_lite.perceptual.ppl_stylegan`.
"""

from __future__ import annotations

from typing import Callable, Optional

from ..errors import InputError
from ..perceptual import ppl_stylegan
from .base import Convention, Render, lpips_or

EPS = 1e-4
SAMPLES = 50
TRIM_PERCENTILES = (1, 99)
SOURCE = "github.com/GoL2022/IMPUS metrics_benchmark.py (calculate_ppl); arXiv 2311.06792"


def measure(frames=None, render: Optional[Render] = None, distance: Optional[Callable] = None,
            inputs=None, network=None, strict: bool = True, samples: int = SAMPLES,
            eps: float = EPS, seed: int = 0) -> dict[str, float]:
    """IMPUS's StyleGAN-form PPL of the path ``render`` (see the module docstring).

    Args:
        render: alphas -> frames (len(alphas), 3, H, W) in [-1, 1]; required.
        distance: batched image distance; None = LPIPS (AlexNet, [-1, 1]).
        samples, eps, seed: number of random alphas, the finite-difference step, the seed.
        frames, inputs, network, strict: not used (the shared interface).
    Returns:
        ``ppl`` (trimmed mean of ``d / eps^2``) and ``samples``.
    """
    if render is None:
        raise InputError("IMPUS's PPL needs render (alphas -> frames): it renders pairs of "
                         f"frames eps = {eps:g} apart at random alphas, which finished frames "
                         "cannot provide.")
    value = ppl_stylegan(render, lpips_or(distance), samples=samples, eps=eps, seed=seed)
    return {"ppl": value, "samples": int(samples)}


CONVENTION = Convention(
    name="impus", keys=("ppl",), frames=None, needs=("render", "distance"),
    better={"ppl": "lower"}, source=SOURCE, measure=measure)
