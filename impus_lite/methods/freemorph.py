"""FreeMorph: tuning-free morphing by attention guided by both inputs (Cao, Si, Wang and Liu,
"FreeMorph: Tuning-Free Generalized Image Morphing with Diffusion Model", ICCV 2025,
https://arxiv.org/abs/2507.01953), reimplemented on diffusers attention processors
(:mod:`impus_lite.attention`) after the authors' code (github.com/yukangcao/FreeMorph at
b7b7068: ``freemorph.py``, ``aid_attention.py``, ``aid_utils.py``; line numbers below refer to
it). No training, no per-image inversion: all N frames, the two ends included, are inverted
and denoised together as one batch whose attention layers look at each other.

**Inputs and shapes.** Images x_0, x_1 (1, 3, S, S) in [-1, 1]; VAE latents
``l_k = E(x_k)`` (1, 4, S/f, S/f) (posterior mean times the scaling factor); text embeddings
e_0, e_1 (1, L, D) of each image's caption (``prompts``, else :mod:`impus_lite.methods.captions`); N frames j = 0 .. N-1 at
positions ``p_j = j / (N-1)`` with attention coefficients

    c_j = F^{-1}_{Beta(20, 20)}(j / (N-1))        (c_0 = 0, c_{N-1} = 1; aid_utils.py:140-158)

for N = 7: 0, 0.4235, 0.4658, 0.5, 0.5342, 0.5765, 1. The result's ``alphas`` are the c_j.

**Guidance-aware spherical interpolation.** The start latents are spherical interpolations of
the two inputs' latents, the prompts linear ones (freemorph.py:190-198):

    z_j(0) = slerp(l_0, l_1, p_j)      (N, 4, h, w)        e(p_j) = lerp(e_0, e_1, p_j)   (N, L, D)

They are inverted by DDIM (guidance 1, conditional branch) over the first n = int(S * strength)
steps t_1 < ... < t_n of an S-step grid (their 40 of 50; freemorph.py:140-141, 191-192), each
step solved by fixed-point iteration of the implicit DDIM inversion (freemorph.py:67-70):

    z(t_i) <- DDIM-inverse-step(z(t_{i-1}), eps(z(t_i), t_i, e(p_j)))   5 times, from z(t_i) = z(t_{i-1})

(one iteration is the explicit inversion of :func:`impus_lite.inversion.ddim_invert`; five make
each step invertible to about 1e-8 in mean squared latent error on the tiny test model)

while the attention of every self- and cross-attention layer is guided by the batch (step
index i = 0 .. n-1 counted against the whole grid S, as freemorph.py:42-66 does;
``Attn(Q, K, V) = softmax(Q K^T / sqrt(d)) V``, K_0, V_0 of frame 0 and K_{N-1}, V_{N-1} of
frame N-1 in the same UNet call):

    plain                                                     i <= int(0.3 S) or i = int(0.6 S)
    prior    A_j = (1/N) sum_m Attn(Q_m, K_m, V_m)            int(0.3 S) < i < int(0.6 S)
    inputs   A_j = 1/2 Attn(Q_j, K_0, V_0) + 1/2 Attn(Q_j, K_{N-1}, V_{N-1})      i > int(0.6 S)

("prior": their ``OuterConvergedAttnProcessor_SDPA``, the frames' mean attention output,
:func:`impus_lite.attention.averaging_frames`; "inputs": ``OuterConvergedAttnProcessor_SDPA2``
without coefficients, AID's outer form at a = 1/2 between the batch's ends,
:func:`impus_lite.attention.interpolating_batch_ends`; in cross-attention K_0, V_0 come from
frame 0's text, :func:`impus_lite.attention.interpolating_cross`). The ends are inverted in the
same batch, so their codes feel the others' attention too.

**High-frequency noise injection** (freemorph.py:207-218). Each middle frame's inverted code
keeps its centred low-frequency box and takes the rest of its spectrum from one Gaussian draw
n (1, 4, h, w) shared by all frames:

    z_j <- IFFT( M_j * FFT(z_j) + (1 - M_j) * FFT(n) ),   M_j = 1 on |u|, |v| < r_j h/2 (centred)

with r_j = 44/48 for the frames next to the ends and 42/48 for the others.

**Step-oriented variation trend** (freemorph.py:75-122). DDIM denoising from t_n back over the
same n steps with guidance w (``eps = eps_u + w (eps_c - eps_u)``, the unconditional branch with
plain attention); in the conditional branch, at step i of n, every self- and cross-attention
layer blends the two inputs' attention by the frame's coefficient (AID's processors,
:data:`impus_lite.attention.FORMS`):

    outer   A_j = (1-c_j) Attn(Q_j, K_0, V_0) + c_j Attn(Q_j, K_{N-1}, V_{N-1})          i < int(0.2 n)
    fused   A_j = (1-c_j) Attn(Q_j, [K_j, K_0], [V_j, V_0])
                  + c_j Attn(Q_j, [K_j, K_{N-1}], [V_j, V_{N-1}])                          i < int(0.6 n)
    plain                                                                                  after

``[., .]`` concatenates along the token axis. At c_0 = 0 and c_{N-1} = 1 the end rows attend
as plain attention does. The frames are ``D(z_j)`` (N, 3, S, S) in [-1, 1]; frame 0 and N-1 are
then replaced by the inputs x_0, x_1 (freemorph.py:237-238; ``ends="rendered"`` keeps the
decoded ends, which differ from the inputs because the inversion mixed them with the others).
With the ends replaced, a guidance that pulls the rendered ends away from the inputs shows only
as a jump at the first or last step: on the classroom model at the published w = 7.5 with one
shared prompt ("cat face dog face") every rendered frame of the cat-dog pair, the dog end
included, is a cat; with each image's own caption (the default, as their per-image captions)
the frames go from the cat to the dog, and ``guidance=1`` keeps the rendered ends nearer the
inputs still.

Cost: n * 5 * N UNet evaluations to invert, n * 2 * N to denoise (n * N at w = 1).

**Departures from the public code** (file:line at b7b7068):

- Model and size: Stable Diffusion 2.1 (v-prediction) at 768 px in fp16 with TF32
  (freemorph.py:132-139, 151-154, 173); here whatever model is loaded, at ``config.size`` or
  its resolution, in ``config.precision``.
- Real images: they centre-crop and resize with Lanczos (aid_utils.py:21-34); here
  ``config.resize_mode`` and ``config.resample`` (the fast preset's crop and Lanczos are theirs).
  They sample the VAE posterior (freemorph.py:185); here its mean (deterministic).
- Prompts: theirs are per-image captions of five phrases by LLaVA-NeXT (caption.py:124-165,
  read at freemorph.py:165, 175-182); here the morph's prompt for both images unless
  ``prompts`` gives one per image. With one shared prompt the "inputs", "outer" and "fused"
  forms equal plain cross-attention; the "prior" mean does not. Their unconditional rows are
  the lerp of two empty prompts (freemorph.py:196-198); here ``negative_prompt`` once ("").
- Steps: their grid is 50 steps (freemorph.py:140), and so is ``steps`` here, whatever the
  preset (``config.sample_steps`` is not read). Their grids are shifted by one, ``timesteps - 1``
  (freemorph.py:191, 219: diffusers' leading grid 1, 21, ..., 981 becomes 0, 20, ..., 980);
  here the model's grid on ``config.timestep_spacing``, unshifted (the fast preset: trailing,
  ..., 799 for n = 40 of 50). The two grids meet at t_n either way.
- Frames: always 7 (freemorph.py:188, 209); here ``config.frames`` or ``frames`` (7).
- Slerp: theirs normalises along the last axis (aid_utils.py:96-104), so each latent row of
  width w is slerped with its own angle; here the whole latent is one vector
  (:func:`impus_lite.interp.slerp`).
- Noise injection: their band half-widths are absolute for a 96-cell latent, taken from a
  nine-entry list at k = 1 .. 5 (freemorph.py:207-214), so of 7 frames frame 1 gets 44 and
  frame 5 gets 42; here they are fractions of h/2 and symmetric (frames 1 and N-2 get 44/48).
  Their noise is one global-RNG draw after ``set_seed(42)`` (freemorph.py:131, 159); here a
  generator seeded with ``config.seed``.
- Batch: as theirs, all N frames run in one UNet batch (the ends must be in it);
  ``config.batch_size`` does not split it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..attention import (averaging_frames, cross_attention_layers, interpolating_batch_ends,
                         interpolating_cross, self_attention_layers)
from ..cache import stage_key
from ..errors import InputError
from ..interp import lerp, slerp
from ..inversion import guidance_noise
from ..schedules import Schedule, beta_alphas, uniform_alphas
from ..text import encode_prompt
from .base import MethodRun, parse_options, start_run
from .captions import image_captions

NAME = "freemorph"
#: MorphConfig fields FreeMorph reads besides the common ones.
USES = ("timestep_spacing", "frames")
ENDS = ("inputs", "rendered")
#: Half-widths of the kept low-frequency band, as fractions of h/2 (theirs: 44 and 42 of 48).
NEAR_END_BAND, INNER_BAND = 44 / 48, 42 / 48

Attention = Callable[[int], ContextManager]


@dataclass(frozen=True)
class Options:
    """FreeMorph's settings; defaults are its public code's.

    Attributes:
        frames: frames with the ends when ``config.frames`` is None (their 7).
        steps: DDIM grid S (their 50, whatever the preset); None = ``config.sample_steps``.
        strength: fraction of the grid inverted and denoised back, n = int(S * strength) (0.8).
        fixed_point_iterations: iterations of each implicit inversion step (5; 1 = plain DDIM).
        guidance: classifier-free guidance of the denoising (7.5).
        beta_a, beta_b: the Beta prior of the attention coefficients c_j (20, 20).
        guided_inversion: the "prior" and "inputs" attention during inversion (module docstring).
        inversion_phases: (0.3, 0.6): the fractions of S where "prior" starts and "inputs" takes over.
        variation_trend: the coefficient-weighted blend of the ends' attention during denoising.
        trend_phases: (0.2, 0.6): the fractions of n where "outer" turns "fused" and where it stops.
        noise_injection: high-frequency Gaussian noise in the middle frames' codes.
        ends: "inputs" (their code: the end frames are the input images) or "rendered".
        prompts: two prompts, one per image; None = each image's caption
            (:mod:`impus_lite.methods.captions`: caption file, file name, else the morph's prompt).
        negative_prompt: the unconditional branch's prompt ("").
    """

    frames: int = 7
    steps: Optional[int] = 50
    strength: float = 0.8
    fixed_point_iterations: int = 5
    guidance: float = 7.5
    beta_a: float = 20.0
    beta_b: float = 20.0
    guided_inversion: bool = True
    inversion_phases: Sequence[float] = (0.3, 0.6)
    variation_trend: bool = True
    trend_phases: Sequence[float] = (0.2, 0.6)
    noise_injection: bool = True
    ends: str = "inputs"
    prompts: Optional[Sequence[str]] = None
    negative_prompt: str = ""

    def __post_init__(self):
        if self.frames < 2:
            raise InputError(f"FreeMorph needs at least 2 frames, got frames={self.frames}.")
        if self.steps is not None and self.steps < 1:
            raise InputError(f"FreeMorph's steps must be >= 1 or None, got {self.steps}.")
        if not 0.0 < self.strength <= 1.0:
            raise InputError(f"FreeMorph's strength must be in (0, 1], got {self.strength}.")
        if self.fixed_point_iterations < 1:
            raise InputError(f"FreeMorph's fixed_point_iterations must be >= 1, got {self.fixed_point_iterations}.")
        if self.beta_a <= 0 or self.beta_b <= 0:
            raise InputError(f"FreeMorph's Beta prior needs beta_a, beta_b > 0, got {self.beta_a}, {self.beta_b}.")
        for name in ("inversion_phases", "trend_phases"):
            phases = tuple(float(x) for x in getattr(self, name))
            if len(phases) != 2 or not 0.0 <= phases[0] <= phases[1] <= 1.0:
                raise InputError(f"FreeMorph's {name} must be two fractions 0 <= a <= b <= 1, got "
                                 f"{getattr(self, name)}.")
            object.__setattr__(self, name, phases)
        if self.ends not in ENDS:
            raise InputError(f"Unknown FreeMorph ends '{self.ends}': use one of {', '.join(ENDS)}.")
        if self.prompts is not None:
            prompts = tuple(self.prompts)
            if len(prompts) != 2 or not all(isinstance(p, str) and p.strip() for p in prompts):
                raise InputError("FreeMorph's prompts must be two non-empty prompts, one per image.")
            object.__setattr__(self, "prompts", prompts)


# ---- the schedule of a morph -----------------------------------------------------------------

def coefficients(frames: int, a: float = 20.0, b: float = 20.0) -> list[float]:
    """The attention coefficients c_j = F^{-1}_{Beta(a, b)}(j / (N-1)), j = 0 .. N-1, from 0 to 1:
    the frames' alphas (their ``generate_beta_tensor(7, 20, 20)``)."""
    return beta_alphas(frames, a, b)


def partial_grid(model, steps: int, strength: float, spacing: Optional[str]) -> tuple[list[int], list[int]]:
    """(inversion timesteps t_1 < ... < t_n, denoising timesteps t_n > ... > t_1): the first
    n = int(steps * strength) steps of the model's ``steps``-step DDIM grid, as their
    ``invert_timesteps[:int(steps * edit_strength)]`` and ``forward_timesteps[steps - n:]``."""
    n = int(steps * strength)
    if n < 1:
        raise InputError(f"FreeMorph inverts int(steps * strength) steps: {steps} x {strength} gives none.")
    inverse = model.ddim_inverse_scheduler(spacing)
    inverse.set_timesteps(steps)
    forward = model.ddim_scheduler(spacing)
    forward.set_timesteps(steps)
    return [int(t) for t in inverse.timesteps[:n]], [int(t) for t in forward.timesteps[steps - n:]]


def inversion_phase(i: int, steps: int, phases: Sequence[float] = (0.3, 0.6)) -> str:
    """The attention of inversion step ``i`` (0-based) on a ``steps``-step grid: "plain",
    "prior" (strictly between int(a S) and int(b S)) or "inputs" (after int(b S)); step
    int(b S) itself stays plain, as in freemorph.py:45-66."""
    start, switch = int(steps * phases[0]), int(steps * phases[1])
    if start < i < switch:
        return "prior"
    return "inputs" if i > switch else "plain"


def trend_phase(i: int, n: int, phases: Sequence[float] = (0.2, 0.6)) -> str:
    """The attention of denoising step ``i`` (0-based) of ``n``: "outer" before int(a n),
    "fused" before int(b n), then "plain" (freemorph.py:90-107)."""
    if i < int(n * phases[0]):
        return "outer"
    return "fused" if i < int(n * phases[1]) else "plain"


def band_fractions(frames: int) -> list[Optional[float]]:
    """Per frame, the kept low-frequency half-width as a fraction of h/2, None for the ends
    (no injection): 44/48 next to the ends, 42/48 inside."""
    return [None if j in (0, frames - 1) else NEAR_END_BAND if j in (1, frames - 2) else INNER_BAND
            for j in range(frames)]


def inject_high_frequencies(code: torch.Tensor, noise: torch.Tensor, fraction: float) -> torch.Tensor:
    """``code`` (B, C, h, w) with the frequencies outside the centred box of half-sides
    ``int(fraction * h/2)``, ``int(fraction * w/2)`` taken from ``noise`` (same shape): their
    ``fourier_filter`` (aid_utils.py:161-188). As theirs it keeps the real part of the inverse
    transform; the box ``[h/2 - r, h/2 + r)`` is one frequency wider on the negative side, so
    the two frequencies +-r at its edge are averaged between code and noise. Computed in
    float32, returned in code's dtype."""
    h, w = code.shape[-2:]
    rows, cols = int(fraction * h / 2), int(fraction * w / 2)
    spectrum = torch.fft.fftshift(torch.fft.fftn(code.float(), dim=(-2, -1)), dim=(-2, -1))
    other = torch.fft.fftshift(torch.fft.fftn(noise.float(), dim=(-2, -1)), dim=(-2, -1))
    keep = torch.zeros(h, w, dtype=torch.bool, device=code.device)
    keep[h // 2 - rows:h // 2 + rows, w // 2 - cols:w // 2 + cols] = True
    mixed = torch.where(keep, spectrum, other)
    return torch.fft.ifftn(torch.fft.ifftshift(mixed, dim=(-2, -1)), dim=(-2, -1)).real.to(code.dtype)


# ---- attention, one context manager per step --------------------------------------------------

def _layers(model) -> tuple[list[str], list[str]]:
    return self_attention_layers(model.unet), cross_attention_layers(model.unet)


def batch_attention(model, form: str, alphas: Sequence[float], text_ends: torch.Tensor) -> ContextManager:
    """Self-attention combined by ``form`` between the batch's first and last frame at
    ``alphas``, and cross-attention by the same form between the ends' text ``text_ends``
    (2, L, D)."""
    self_layers, cross_layers = _layers(model)
    stack = contextlib.ExitStack()
    stack.enter_context(interpolating_batch_ends(model.unet, alphas, form, self_layers))
    stack.enter_context(interpolating_cross(model.unet, text_ends, alphas, form, cross_layers))
    return stack


def inversion_attention(model, options: Options, steps: int, frames: int, text_ends: torch.Tensor) -> Attention:
    """``attention(i)``: the attention of inversion step i (module docstring: plain, prior,
    inputs); plain throughout without ``guided_inversion``."""
    def attention(i: int) -> ContextManager:
        phase = inversion_phase(i, steps, options.inversion_phases) if options.guided_inversion else "plain"
        if phase == "prior":
            return averaging_frames(model.unet, frames)
        if phase == "inputs":
            return batch_attention(model, "outer", [0.5] * frames, text_ends)
        return contextlib.nullcontext()
    return attention


def trend_attention(model, options: Options, n: int, alphas: Sequence[float], text_ends: torch.Tensor) -> Attention:
    """``attention(i)``: the attention of denoising step i of n (outer, fused, plain); plain
    throughout without ``variation_trend``."""
    def attention(i: int) -> ContextManager:
        phase = trend_phase(i, n, options.trend_phases) if options.variation_trend else "plain"
        return contextlib.nullcontext() if phase == "plain" else batch_attention(model, phase, alphas, text_ends)
    return attention


# ---- inversion and denoising of the batch ------------------------------------------------------

def conditional_noise(model, z: torch.Tensor, t: int, cond: torch.Tensor) -> torch.Tensor:
    """The conditional branch's noise prediction (B, 4, h, w) for latents z (B, 4, h, w) and
    embeddings cond (B, L, D) (guidance 1), float32."""
    return guidance_noise(model, z, torch.tensor(t), cond, cond, torch.ones(z.shape[0]), None, None)


@torch.no_grad()
def fixed_point_inversion(model, latents: torch.Tensor, cond: torch.Tensor, timesteps: Sequence[int],
                          iterations: int, attention: Attention, spacing: Optional[str], steps: int,
                          progress: bool = False) -> torch.Tensor:
    """Invert ``latents`` (B, 4, h, w) to the noise level of ``timesteps[-1]`` with DDIM
    (guidance 1), every step the fixed point of the implicit update
    ``z_i = DDIM-inverse-step(z_{i-1}, eps(z_i, t_i))`` iterated ``iterations`` times from
    ``z_i = z_{i-1}`` (1 iteration: the usual explicit inversion), inside ``attention(i)``."""
    scheduler = model.ddim_inverse_scheduler(spacing)
    scheduler.set_timesteps(steps, device=model.device)
    z = latents.detach().float().to(model.device)
    for i, t in enumerate(tqdm(timesteps, desc="FreeMorph inversion", disable=not progress, leave=False)):
        estimate = z
        with attention(i):
            for _ in range(iterations):
                eps = conditional_noise(model, estimate, t, cond)
                estimate = scheduler.step(eps, t, z).prev_sample.float()
        z = estimate
    return z


@torch.no_grad()
def guided_denoising(model, codes: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                     timesteps: Sequence[int], guidance: float, attention: Attention,
                     spacing: Optional[str], steps: int, progress: bool = False) -> torch.Tensor:
    """DDIM (eta = 0) from ``codes`` (B, 4, h, w) over ``timesteps`` (decreasing) with
    ``eps = eps_u + w (eps_c - eps_u)``; the conditional branch runs inside ``attention(i)``, the
    unconditional one (uncond (1, L, D)) plainly. Returns float32 latents."""
    scheduler = model.ddim_scheduler(spacing)
    scheduler.set_timesteps(steps, device=model.device)
    z = codes.detach().float().to(model.device)
    for i, t in enumerate(tqdm(timesteps, desc="FreeMorph denoising", disable=not progress, leave=False)):
        with attention(i):
            eps = conditional_noise(model, z, t, cond)
        if guidance != 1.0:
            eps_u = conditional_noise(model, z, t, uncond.expand(z.shape[0], -1, -1))
            eps = eps_u + guidance * (eps - eps_u)
        z = scheduler.step(eps, t, z).prev_sample.float()
    return z


class FreeMorphPath:
    """The N frames of a FreeMorph morph between two latents.

    Args:
        latents: (2, 4, h, w) the inputs' VAE latents; embeddings: (2, L, D) their prompts';
        uncond: (1, L, D) the negative prompt's; frames: N; steps: the grid S.
    Attributes:
        alphas: the coefficients c_j; positions: p_j = j / (N-1);
        inversion_timesteps, denoising_timesteps: the n steps (:func:`partial_grid`).
    """

    def __init__(self, model, latents: torch.Tensor, embeddings: torch.Tensor, uncond: torch.Tensor,
                 options: Options, frames: int, steps: int, spacing: Optional[str], seed: int = 0,
                 progress: bool = False):
        self.model, self.latents, self.embeddings, self.uncond = model, latents, embeddings, uncond
        self.options, self.frames, self.steps, self.spacing = options, frames, steps, spacing
        self.seed, self.progress = seed, progress
        self.alphas = coefficients(frames, options.beta_a, options.beta_b)
        self.positions = uniform_alphas(frames)
        self.inversion_timesteps, self.denoising_timesteps = partial_grid(model, steps, options.strength, spacing)

    def start_latents(self) -> torch.Tensor:
        """slerp(l_0, l_1, p_j): (N, 4, h, w)."""
        return slerp(self.latents[0:1], self.latents[1:2], self.positions).reshape(
            self.frames, *self.latents.shape[1:])

    def text(self) -> torch.Tensor:
        """lerp(e_0, e_1, p_j): (N, L, D)."""
        return lerp(self.embeddings[0:1], self.embeddings[1:2], self.positions).reshape(
            self.frames, *self.embeddings.shape[1:])

    def invert(self) -> torch.Tensor:
        """The batch's inverted codes (N, 4, h, w) at t_n, before noise injection."""
        o = self.options
        attention = inversion_attention(self.model, o, self.steps, self.frames, self.embeddings)
        return fixed_point_inversion(self.model, self.start_latents(), self.text(), self.inversion_timesteps,
                                     o.fixed_point_iterations, attention, self.spacing, self.steps, self.progress)

    def injected(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes`` (N, 4, h, w) with the middle frames' high frequencies from one Gaussian draw
        (seeded by ``seed``); unchanged without ``noise_injection``."""
        if not self.options.noise_injection:
            return codes
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn((1, *codes.shape[1:]), generator=generator).to(codes.device, codes.dtype)
        rows = [code[None] if fraction is None else inject_high_frequencies(code[None], noise, fraction)
                for code, fraction in zip(codes, band_fractions(self.frames))]
        return torch.cat(rows)

    def denoise(self, codes: torch.Tensor) -> torch.Tensor:
        """Frames (N, 3, S, S) in [-1, 1] from inverted codes (N, 4, h, w), the ends as rendered."""
        o = self.options
        attention = trend_attention(self.model, o, len(self.denoising_timesteps), self.alphas, self.embeddings)
        latents = guided_denoising(self.model, self.injected(codes), self.text(), self.uncond,
                                   self.denoising_timesteps, o.guidance, attention, self.spacing, self.steps,
                                   self.progress)
        return self.model.decode(latents).cpu()


# ---- the method ---------------------------------------------------------------------------------

def inverted_batch(run: MethodRun, path: FreeMorphPath, prompts: Sequence[str]) -> torch.Tensor:
    """Stage "inversion": :meth:`FreeMorphPath.invert`, cached by both images' content, the
    model, the prompts and every setting the inversion reads."""
    o, m = path.options, run.model
    key = stage_key("freemorph-inversion", images=run.digests, model=m.fingerprint, dtype=str(m.dtype),
                    prompts=list(prompts), frames=path.frames, steps=path.steps, strength=o.strength,
                    spacing=path.spacing, iterations=o.fixed_point_iterations, guided=o.guided_inversion,
                    phases=list(o.inversion_phases))
    with run.stage("inversion") as stats:
        cached = run.cache.load("inversion", key)
        stats.cached = cached is not None
        if cached is None:
            cached = {"codes": path.invert().cpu()}
            run.cache.save("inversion", key, cached)
    return cached["codes"].to(m.device)


def _note(path: FreeMorphPath) -> str:
    o, n = path.options, len(path.inversion_timesteps)
    parts = [f"FreeMorph: {path.frames} frames in one batch, inversion over {n} of {path.steps} steps "
             f"({o.fixed_point_iterations} fixed-point iterations each"
             + (", attention guided by both inputs)" if o.guided_inversion else ", plain attention)"),
             f"variation trend with Beta({o.beta_a:g}, {o.beta_b:g}) coefficients" if o.variation_trend
             else "no variation trend",
             "high-frequency noise injection" if o.noise_injection else "no noise injection",
             f"guidance {o.guidance:g}",
             "alphas are the attention coefficients; start latents and prompts sit at uniform positions",
             "end frames are the inputs" if o.ends == "inputs" else "end frames as rendered"]
    return "; ".join(parts)


def run(model, image0, image1, prompt, config, cache_dir=None, lpips=None, progress=True):
    """Morph by FreeMorph; returns a MorphResult (stages encode, inversion, frames) whose alphas
    are the Beta(20, 20) coefficients of ``config.frames`` or ``frames`` (7) frames."""
    options = parse_options(Options, NAME, config.method_options)
    run = start_run(NAME, USES, model, image0, image1, prompt, config, cache_dir, lpips, progress)
    prompts = options.prompts or image_captions((image0, image1), prompt)[0]
    embeddings = torch.cat([encode_prompt(model, p) for p in prompts])
    uncond = encode_prompt(model, options.negative_prompt, allow_empty=True)
    path = FreeMorphPath(model, run.latents(), embeddings, uncond, options, config.frames or options.frames,
                         options.steps or config.sample_steps, config.timestep_spacing, config.seed, progress)
    codes = inverted_batch(run, path, prompts)
    with run.stage("frames"):
        frames = path.denoise(codes)
        if options.ends == "inputs":
            frames[0], frames[-1] = run.images[0], run.images[1]
        distances = [float(d) for d in torch.as_tensor(run.lpips(frames[:-1], frames[1:])).reshape(-1)]
    run.notes.append(_note(path))
    return run.finish(Schedule(path.alphas, frames, distances, None, path.frames))
