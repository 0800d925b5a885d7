"""A tiny 2D diffusion model, its DDIM encoder, and the comparison with exact optimal transport.

Khrulkov et al. (ICLR 2023) observed that the DDIM encoder, the probability-flow ODE run from
data to noise, is (close to) the Monge optimal-transport map between the data distribution and
the standard Gaussian under the quadratic cost. This module lets a notebook check that claim on
2D samples in seconds on a CPU:

* data: samples of a Gaussian, a Gaussian mixture or two moons (plain numpy, seeded);
* model: a small MLP noise predictor ``eps_theta(x_t, t)`` trained with the DDPM loss
  ``E ||eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t)||^2``;
* encoder / decoder: deterministic DDIM (eta = 0) with diffusers' ``DDIMInverseScheduler`` /
  ``DDIMScheduler``;
* comparison: POT's exact plan (``ot.emd``) between the encoder's inputs x_i and its outputs
  z_i, and the closed-form Monge map of a Gaussian N(m, S) onto N(0, I),
  ``x -> S^{-1/2} (x - m)``.

Conventions: points are arrays of shape (n, 2) (numpy float64 out, numpy or torch in);
timesteps are integers in [0, T) with T = ``num_train_timesteps`` (1000); ``abar_t`` is
diffusers' ``alphas_cumprod[t]``. Everything is seeded and runs on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import ot
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, DDPMScheduler
from torch import nn
from tqdm.auto import tqdm

from .runtime import one_torch_thread

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[Sequence[float]]]

#: The DDPM noise schedule of Ho et al. (2020): 1000 linear betas from 1e-4 to 0.02. DDIM uses
#: "trailing" timesteps (the last step reaches t = 999) and abar = 1 beyond t = 0.
SCHEDULE_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=1e-4,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="epsilon",
    clip_sample=False,
)
_DDIM_EXTRA = dict(set_alpha_to_one=True, timestep_spacing="trailing", steps_offset=0)

__all__ = [
    "SCHEDULE_CONFIG", "sample_gaussian", "sample_gaussian_mixture", "sample_moons",
    "forward_noise", "NoisePredictor", "ToyDiffusion", "train_toy_diffusion", "OTComparison",
    "compare_with_exact_ot", "fit_gaussian", "gaussian_monge_matrix", "gaussian_monge_map",
]


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def _check_n(n: int) -> int:
    if int(n) != n or n <= 0:
        raise ValueError(f"The number of samples must be a positive integer, got {n}.")
    return int(n)


def sample_gaussian(n: int, mean: Sequence[float] = (0.0, 0.0),
                    cov: ArrayLike = ((1.0, 0.0), (0.0, 1.0)), seed: int = 0) -> np.ndarray:
    """n samples (n, 2) of N(mean, cov); ``cov`` must be symmetric positive definite."""
    n = _check_n(n)
    mean = np.asarray(mean, dtype=np.float64)
    cov = np.asarray(cov, dtype=np.float64)
    if mean.shape != (2,) or cov.shape != (2, 2):
        raise ValueError(f"mean must have shape (2,) and cov (2, 2), got {mean.shape} and {cov.shape}.")
    if not np.allclose(cov, cov.T) or np.linalg.eigvalsh(cov).min() <= 0:
        raise ValueError("cov must be symmetric positive definite.")
    return np.random.default_rng(seed).multivariate_normal(mean, cov, size=n)


def sample_gaussian_mixture(n: int, centers: Optional[ArrayLike] = None, std: float = 0.2,
                            weights: Optional[Sequence[float]] = None, seed: int = 0) -> np.ndarray:
    """n samples (n, 2) of an isotropic Gaussian mixture.

    Args:
        centers: (k, 2) component means; default the four corners (+-1.5, +-1.5).
        std: the common standard deviation of every component (> 0).
        weights: (k,) mixture weights (default uniform), normalised here.
    """
    n = _check_n(n)
    if centers is None:
        centers = [(-1.5, -1.5), (-1.5, 1.5), (1.5, -1.5), (1.5, 1.5)]
    centers = np.asarray(centers, dtype=np.float64)
    if centers.ndim != 2 or centers.shape[1] != 2:
        raise ValueError(f"centers must have shape (k, 2), got {centers.shape}.")
    if std <= 0:
        raise ValueError(f"std must be positive, got {std}.")
    k = len(centers)
    w = np.full(k, 1.0 / k) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (k,) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be {k} non-negative numbers with a positive sum.")
    rng = np.random.default_rng(seed)
    labels = rng.choice(k, size=n, p=w / w.sum())
    return centers[labels] + std * rng.standard_normal((n, 2))


def sample_moons(n: int, noise: float = 0.08, seed: int = 0) -> np.ndarray:
    """n samples (n, 2) of the "two moons": two interleaved half circles of radius 1 with
    Gaussian jitter of std ``noise``, centred on the origin (x in about [-1.5, 1.5]).

    The upper moon is ``(cos s, sin s)``, the lower one ``(1 - cos s, 0.5 - sin s)``, s uniform
    in [0, pi]; the union is shifted by (-0.5, -0.25).
    """
    n = _check_n(n)
    if noise < 0:
        raise ValueError(f"noise must be non-negative, got {noise}.")
    rng = np.random.default_rng(seed)
    upper = rng.random(n) < 0.5
    s = rng.uniform(0.0, math.pi, size=n)
    x = np.where(upper, np.cos(s), 1.0 - np.cos(s))
    y = np.where(upper, np.sin(s), 0.5 - np.sin(s))
    points = np.stack([x - 0.5, y - 0.25], axis=1)
    return points + noise * rng.standard_normal((n, 2))


def _as_points(x: ArrayLike, name: str = "x") -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x,
                                   dtype=np.float32))
    if t.ndim != 2 or t.shape[1] != 2 or t.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty array of 2D points, shape (n, 2), "
                         f"got {tuple(t.shape)}.")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} holds NaN or infinite values.")
    return t


def forward_noise(x: ArrayLike, timestep: int, seed: int = 0,
                  scheduler_config: Optional[dict] = None) -> np.ndarray:
    """Samples of the forward process q(x_t | x_0) (n, 2): ``sqrt(abar_t) x + sqrt(1 - abar_t) eps``.

    eps ~ N(0, I) is seeded; ``timestep`` is in [0, T); the schedule is
    :data:`SCHEDULE_CONFIG` unless ``scheduler_config`` is given (diffusers'
    ``DDPMScheduler.add_noise``).
    """
    scheduler = DDPMScheduler(**(scheduler_config or SCHEDULE_CONFIG))
    x = _as_points(x)
    T = scheduler.config.num_train_timesteps
    if int(timestep) != timestep or not 0 <= timestep < T:
        raise ValueError(f"timestep must be an integer in [0, {T}), got {timestep}.")
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    t = torch.full((x.shape[0],), int(timestep), dtype=torch.long)
    return scheduler.add_noise(x, noise, t).double().numpy()


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

class NoisePredictor(nn.Module):
    """The noise predictor ``eps_theta(x_t, t)``: an MLP on a 2D point and its timestep.

    Inputs of the MLP, concatenated:

    * the point x_t itself (2 numbers);
    * with ``fourier_features = F > 0``, ``sin(f_j x)`` and ``cos(f_j x)`` of each coordinate at
      F frequencies ``f_j`` spaced geometrically from 1 to ``max_frequency`` (4F numbers): they
      let a small MLP follow thin structures such as the moons. A Gaussian's ideal noise
      predictor is linear in x_t, so F = 0 is the natural choice there;
    * the timestep through ``time_dim`` sinusoidal features ``[sin(t w_k), cos(t w_k)]``,
      ``w_k = 10000^(-k / (time_dim / 2))``.

    Shapes: ``forward(x (B, 2) float32, t (B,) or scalar timesteps in [0, T)) -> (B, 2)``.
    """

    def __init__(self, hidden: int = 128, depth: int = 3, time_dim: int = 32,
                 fourier_features: int = 6, max_frequency: float = 8.0):
        super().__init__()
        if hidden <= 0 or depth <= 0 or time_dim <= 0 or time_dim % 2:
            raise ValueError("hidden and depth must be positive and time_dim a positive even number.")
        if fourier_features < 0 or max_frequency < 1:
            raise ValueError("fourier_features must be >= 0 and max_frequency >= 1.")
        half = time_dim // 2
        self.register_buffer("time_frequencies",
                             torch.exp(-math.log(10000.0) * torch.arange(half) / half))
        self.register_buffer("space_frequencies",
                             torch.exp(torch.linspace(0.0, math.log(max_frequency), fourier_features)))
        layers: list[nn.Module] = []
        width = 2 + 4 * fourier_features + time_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(x.shape[0])
        time_angles = t[:, None] * self.time_frequencies[None, :]
        space_angles = (x[:, :, None] * self.space_frequencies[None, None, :]).flatten(1)
        features = [x, torch.sin(space_angles), torch.cos(space_angles),
                    torch.sin(time_angles), torch.cos(time_angles)]
        return self.net(torch.cat(features, dim=1))


@dataclass
class ToyDiffusion:
    """A trained 2D diffusion model with its schedule.

    Attributes:
        model: the noise predictor (eval mode, CPU).
        scheduler_config: the training schedule (see :data:`SCHEDULE_CONFIG`).
        losses: the DDPM training loss at every step.
    """

    model: NoisePredictor
    scheduler_config: dict = field(default_factory=lambda: dict(SCHEDULE_CONFIG))
    losses: list = field(default_factory=list)

    def forward_noise(self, x: ArrayLike, timestep: int, seed: int = 0) -> np.ndarray:
        """Samples of q(x_t | x_0) under this model's schedule: see :func:`forward_noise`."""
        return forward_noise(x, timestep, seed=seed, scheduler_config=self.scheduler_config)

    @torch.no_grad()
    def _run(self, scheduler, x: torch.Tensor, num_steps: int, trajectory: bool, progress: bool,
             desc: str):
        T = scheduler.config.num_train_timesteps
        if int(num_steps) != num_steps or not 1 <= num_steps <= T:
            raise ValueError(f"num_steps must be an integer in [1, {T}], got {num_steps}.")
        scheduler.set_timesteps(int(num_steps))
        path = [x.double().numpy()]
        with one_torch_thread():
            for t in tqdm(scheduler.timesteps, desc=desc, disable=not progress, leave=False):
                eps = self.model(x, t)
                x = scheduler.step(eps, int(t), x).prev_sample
                if trajectory:
                    path.append(x.double().numpy())
        out = x.double().numpy()
        return (out, np.stack(path)) if trajectory else out

    def encode(self, x: ArrayLike, num_steps: int = 100, return_trajectory: bool = False,
               progress: bool = True):
        """DDIM encoder: data points (n, 2) -> codes (n, 2), by the probability-flow ODE.

        Each step (diffusers' ``DDIMInverseScheduler``, eta = 0) goes from noise level s to
        t > s with ``x_t = sqrt(abar_t) x0_hat + sqrt(1 - abar_t) eps_theta``,
        ``x0_hat = (x_s - sqrt(1 - abar_s) eps_theta) / sqrt(abar_s)``, the model being
        evaluated at t (the usual inversion approximation). ``num_steps`` steps end at t = 999.

        Returns:
            codes (n, 2), and with ``return_trajectory`` also the path (num_steps + 1, n, 2).
        """
        scheduler = DDIMInverseScheduler(**{**self.scheduler_config, **_DDIM_EXTRA})
        return self._run(scheduler, _as_points(x), num_steps, return_trajectory, progress,
                         "DDIM encode")

    def decode(self, z: ArrayLike, num_steps: int = 100, return_trajectory: bool = False,
               progress: bool = True):
        """DDIM decoder (sampler with eta = 0): codes (n, 2) -> data points (n, 2).

        ``DDIMScheduler`` steps from t = 999 down to t = 0 and then to abar = 1, each
        ``x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s) eps_theta(x_t, t)``; the inverse of
        :meth:`encode` up to the discretisation error.

        Returns:
            points (n, 2), and with ``return_trajectory`` also the path (num_steps + 1, n, 2).
        """
        scheduler = DDIMScheduler(**{**self.scheduler_config, **_DDIM_EXTRA})
        return self._run(scheduler, _as_points(z, "z"), num_steps, return_trajectory, progress,
                         "DDIM decode")

    def sample(self, n: int, num_steps: int = 100, seed: int = 0, progress: bool = True) -> np.ndarray:
        """n new points (n, 2): standard Gaussian codes (seeded) passed through :meth:`decode`."""
        z = torch.randn((_check_n(n), 2), generator=torch.Generator().manual_seed(seed))
        return self.decode(z, num_steps=num_steps, progress=progress)


def train_toy_diffusion(data: ArrayLike, steps: int = 3000, batch_size: int = 512,
                        lr: float = 2e-3, hidden: int = 128, depth: int = 3,
                        fourier_features: int = 6, seed: int = 0,
                        progress: bool = True) -> ToyDiffusion:
    """Train a :class:`NoisePredictor` on 2D samples with the DDPM loss.

    Each step draws ``batch_size`` points of ``data`` (with replacement), timesteps t uniform in
    [0, T), eps ~ N(0, I), and minimises ``mean ||eps - eps_theta(x_t, t)||^2`` with Adam and a
    cosine learning-rate decay to zero. The forward process is diffusers' ``DDPMScheduler``
    (:data:`SCHEDULE_CONFIG`). Seeded: the same call gives the same weights. It runs on one CPU
    thread; the defaults take about ten seconds.

    Args:
        data: training points (n, 2), roughly of unit scale.
        steps, batch_size, lr: optimisation settings; hidden, depth: MLP size;
        fourier_features: sine/cosine frequencies per coordinate (see :class:`NoisePredictor`;
            0 for Gaussian data); seed: RNG seed.
        progress: show a tqdm progress bar.
    """
    data = _as_points(data, "data")
    if steps <= 0 or batch_size <= 0 or lr <= 0:
        raise ValueError("steps, batch_size and lr must be positive.")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = NoisePredictor(hidden=hidden, depth=depth, fourier_features=fourier_features)
    scheduler = DDPMScheduler(**SCHEDULE_CONFIG)
    T = scheduler.config.num_train_timesteps
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(steps))
    losses = []
    model.train()
    bar = tqdm(range(int(steps)), desc="DDPM training", disable=not progress, leave=False)
    with one_torch_thread():
        for _ in bar:
            index = torch.randint(0, data.shape[0], (batch_size,), generator=generator)
            x0 = data[index]
            t = torch.randint(0, T, (batch_size,), generator=generator)
            noise = torch.randn(x0.shape, generator=generator)
            loss = torch.mean((model(scheduler.add_noise(x0, noise, t), t) - noise) ** 2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            decay.step()
            losses.append(loss.item())
            if len(losses) % 100 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
    model.eval()
    model.requires_grad_(False)
    return ToyDiffusion(model=model, scheduler_config=dict(SCHEDULE_CONFIG), losses=losses)


# --------------------------------------------------------------------------------------------
# Comparison with optimal transport
# --------------------------------------------------------------------------------------------

@dataclass
class OTComparison:
    """How close a map x_i -> z_i is to the exact optimal transport between the two point sets.

    Attributes:
        map_cost: mean squared displacement of the given map (pairing), ``mean_i |x_i - z_i|^2``.
        ot_cost: the same for the optimal pairing, ``min_sigma mean_i |x_i - z_sigma(i)|^2``
            (always <= map_cost).
        independent_cost: ``mean_{i,j} |x_i - z_j|^2``, the cost of pairing points at random:
            the scale against which the other two are small or not.
        identical_share: fraction of i for which the optimal plan sends x_i to z_i itself.
        permutation: sigma (n,), the optimal assignment ``x_i -> z_sigma(i)``.
    """

    map_cost: float
    ot_cost: float
    independent_cost: float
    identical_share: float
    permutation: np.ndarray

    @property
    def cost_ratio(self) -> float:
        """map_cost / ot_cost (>= 1; 1 means the pairing is optimal)."""
        return self.map_cost / self.ot_cost if self.ot_cost > 0 else float("inf")

    def summary(self) -> str:
        """One line with the four numbers."""
        return (f"mean squared displacement: map {self.map_cost:.4f}, exact OT "
                f"{self.ot_cost:.4f} (ratio {self.cost_ratio:.3f}), random pairing "
                f"{self.independent_cost:.4f}; identical assignments {100 * self.identical_share:.1f}%")


def compare_with_exact_ot(x: ArrayLike, z: ArrayLike) -> OTComparison:
    """Compare the pairing x_i -> z_i (e.g. the DDIM encoder) with the exact OT plan.

    Solves the assignment problem between the uniform measures on {x_i} and {z_j} with ``ot.emd``
    and cost ``|x_i - z_j|^2``. If the given pairing were the Monge map of the two empirical
    measures, the optimal permutation would be the identity and ``cost_ratio`` 1.

    Args:
        x: inputs (n, 2); z: their images (n, 2), in the same order. n up to a few thousand
            (the plan is n x n).
    """
    xs = _as_points(x, "x").double().numpy()
    zs = _as_points(z, "z").double().numpy()
    if xs.shape != zs.shape:
        raise ValueError(f"x and z must have one shape, got {xs.shape} and {zs.shape}.")
    n = xs.shape[0]
    cost = ot.dist(xs, zs)
    plan = ot.emd(np.full(n, 1.0 / n), np.full(n, 1.0 / n), cost)
    sigma = plan.argmax(axis=1)
    return OTComparison(
        map_cost=float(np.mean(np.diag(cost))),
        ot_cost=float(np.mean(cost[np.arange(n), sigma])),
        independent_cost=float(cost.mean()),
        identical_share=float(np.mean(sigma == np.arange(n))),
        permutation=sigma,
    )


def fit_gaussian(x: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Sample mean (2,) and covariance (2, 2) (unbiased) of points (n, 2), n >= 3."""
    xs = _as_points(x).double().numpy()
    if xs.shape[0] < 3:
        raise ValueError("fit_gaussian needs at least 3 points.")
    return xs.mean(axis=0), np.cov(xs, rowvar=False)


def gaussian_monge_matrix(cov: ArrayLike) -> np.ndarray:
    """S^{-1/2} (d, d): the symmetric inverse square root of a covariance S (eigendecomposition).

    ``x -> S^{-1/2} (x - m)`` is the Monge map from N(m, S) to N(0, I): among all maps that push
    N(m, S) to N(0, I) it is the only one that is the gradient of a convex function (a symmetric
    positive definite matrix), hence the one of least mean squared displacement (Brenier).
    """
    cov = np.asarray(cov, dtype=np.float64)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1] or not np.allclose(cov, cov.T):
        raise ValueError(f"cov must be a symmetric square matrix, got shape {cov.shape}.")
    values, vectors = np.linalg.eigh(cov)
    if values.min() <= 0:
        raise ValueError("cov must be positive definite.")
    return (vectors / np.sqrt(values)) @ vectors.T


def gaussian_monge_map(x: ArrayLike, mean: Sequence[float], cov: ArrayLike) -> np.ndarray:
    """The optimal transport map of N(mean, cov) onto N(0, I) applied to points (n, 2):
    ``S^{-1/2} (x - m)``, returned as (n, 2)."""
    xs = _as_points(x).double().numpy()
    mean = np.asarray(mean, dtype=np.float64)
    if mean.shape != (2,):
        raise ValueError(f"mean must have shape (2,), got {mean.shape}.")
    return (xs - mean) @ gaussian_monge_matrix(cov).T
